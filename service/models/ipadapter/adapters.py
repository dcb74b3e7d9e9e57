"""IP-Adapters per request, per row, in shared UNet calls.

A request's adapters ride in its conditioning rows, so rows with different adapters, different
images or none share one UNet call (every row of a model whose store has IP-Adapters carries both
keys, so the scheduler groups them together):

- :data:`TOKENS` ``[rows, MAX_ADAPTERS, MAX_TOKENS, cross_dim]``: each slot's image tokens (the
  adapter's projection of the CLIP embedding; zero padding past the adapter's token count);
- :data:`UNIT` ``[rows, MAX_ADAPTERS, 7]``: adapter id (-1: empty slot), weight, guidance_start,
  guidance_end, 0, and the timestep window ``(t_lo, t_hi]`` it acts in (the ControlNet unit table's
  columns: :meth:`ImageAdapters.bind_schedule` sets the window from the job's sigmas).

Cond rows carry the image's tokens, uncond rows the unconditional image's (zeros through a plain
adapter's projection, the zero image's hidden states through a plus adapter's), at the same weight:
what diffusers' pipelines do with ``set_ip_adapter_scale``. :meth:`ImageAdapters.bind` turns a
call's rows into one group per adapter used (attention.py adds their image attention).
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from service.image_gate import ImageInputError, load
from service.sampling.errors import InputError

from ..controlnet import UNIT as CONTROL_UNIT
from ..controlnet import ControlSet
from . import files, projection
from .attention import Group, hidden_sizes, image_rows, install
from .encoder import ImageEncoder

TOKENS, UNIT = "ip_tokens", "ip_unit"
MAX_ADAPTERS = 3  # images per request (sd-webui-controlnet's unit count)
MAX_TOKENS = 16  # plus adapters' query count; plain adapters use 4
CACHE = 32  # token sets kept (at most 2 x 16 x 2048 floats each: 256 KB)
FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


@dataclass
class Adapter:
    name: str
    kind: str
    proj: nn.Module
    layers: list[tuple[Tensor, Tensor]]
    encoder: ImageEncoder
    tokens: int


@dataclass
class PreparedImage:
    adapter: int
    weight: float
    cond: Tensor  # [T, cross_dim]
    uncond: Tensor
    start: float = 0.0  # guidance_start / guidance_end: the fraction of the steps it acts in
    end: float = 1.0


def _bytes(net: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()])


def _family(cross_dim: int, layers: int) -> str:
    family = FAMILIES.get(cross_dim, "a UNet")
    return f"{family} (cross_attention_dim {cross_dim}, {layers} cross-attention layers)"


@dataclass(eq=False)
class ImageAdapters:
    """The IP-Adapters one loaded SD model uses: loaded on first use and kept (ids are stable)."""

    root: Path  # the model store
    unet: Any
    device: torch.device
    dtype: torch.dtype
    model: str  # the SD model's name (the 422s name it)
    # the memory budget adapters and encoders load within (LoadedModel's reserve), when served
    reserve: Callable[[int], None] | None = None
    adapters: list[Adapter] = dataclasses.field(default_factory=list)
    _ids: dict[Path, int] = dataclasses.field(default_factory=dict)
    _encoders: dict[Path, ImageEncoder] = dataclasses.field(default_factory=dict)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    # the last CACHE images' tokens by (adapter, CLIP pixels digest): a client that sends the same
    # reference image with every request (a character's face) runs the vision model once
    _tokens: OrderedDict[tuple[int, str], Tensor] = dataclasses.field(default_factory=OrderedDict)

    @property
    def cross_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    def resolve(self, name: str, field: str) -> int:
        """The id of the adapter ``name`` (A1111's "name [hash]" too), loaded on first use."""
        known = files.scan(self.root)
        info = known.get(name.strip()) or known.get(name.strip().rsplit(" [", 1)[0])
        if info is None:
            raise InputError(f"{field}.model", f"unknown IP-Adapter {name!r}", sorted(known))
        with self._lock:
            aid = self._ids.get(info.path)
            if aid is None:
                try:
                    self.adapters.append(self._load(info, field))
                except (files.IPAdapterError, OSError, RuntimeError, KeyError) as exc:
                    raise InputError(f"{field}.model", str(exc), sorted(known)) from exc
                aid = self._ids[info.path] = len(self.adapters) - 1
            return aid

    def _load(self, info: files.AdapterFile, field: str) -> Adapter:
        w = files.read(info)
        sizes = hidden_sizes(self.unet)
        fits = w.cross_dim == self.cross_dim and [int(k.shape[0]) for k, _ in w.layers] == sizes
        if not fits or any(v.shape != k.shape for k, v in w.layers):
            raise InputError(
                f"{field}.model",
                f"IP-Adapter {info.name!r} is for {_family(w.cross_dim, len(w.layers))}, but model "
                f"{self.model!r} is {_family(self.cross_dim, len(sizes))}",
            )
        folder = files.pick_encoder(self.root, info, w)
        new_encoder = folder.path not in self._encoders
        # within the memory budget: the files' bytes first (the pool evicts idle models or refuses),
        # then what the loaded tensors hold
        need = info.path.stat().st_size + (
            (folder.path / "model.safetensors").stat().st_size if new_encoder else 0
        )
        self._reserve(need)
        held = 0
        try:
            adapter = self._build(info, w, folder)
            held = _bytes(adapter.proj) + sum(k.nbytes + v.nbytes for k, v in adapter.layers)
            held += _bytes(adapter.encoder.net) if new_encoder else 0
        finally:
            self._reserve(held - need)
        return adapter

    def _reserve(self, nbytes: int) -> None:
        if self.reserve is not None and nbytes:
            self.reserve(nbytes)

    def _build(
        self, info: files.AdapterFile, w: files.AdapterWeights, folder: files.EncoderFolder
    ) -> Adapter:
        try:
            proj = projection.build(w.kind, w.image_proj).to(self.device, self.dtype)
        except (RuntimeError, KeyError, ValueError, IndexError) as exc:
            raise files.IPAdapterError(f"IP-Adapter {info.name!r}: image_proj does not load: {exc}") from exc
        shape = (1, w.embed_dim) if w.kind == "plain" else (1, 1, w.embed_dim)
        with torch.no_grad():
            probe = proj(torch.zeros(shape, dtype=self.dtype, device=self.device))
        if probe.shape[-1] != self.cross_dim or probe.shape[1] > MAX_TOKENS:
            raise files.IPAdapterError(
                f"IP-Adapter {info.name!r} makes {probe.shape[1]} tokens of width {probe.shape[-1]} "
                f"(at most {MAX_TOKENS} of width {self.cross_dim})"
            )
        if folder.path not in self._encoders:
            self._encoders[folder.path] = ImageEncoder(folder, self.device, self.dtype)
        install(self.unet)
        layers = [(k.to(self.device, self.dtype), v.to(self.device, self.dtype)) for k, v in w.layers]
        return Adapter(info.name, w.kind, proj, layers, self._encoders[folder.path], int(probe.shape[1]))

    def held_bytes(self) -> int:
        """The bytes the loaded adapters and encoders hold."""
        layers = sum(k.nbytes + v.nbytes for a in self.adapters for k, v in a.layers)
        return (
            layers
            + sum(_bytes(a.proj) for a in self.adapters)
            + sum(_bytes(e.net) for e in self._encoders.values())
        )

    # --- building a request's rows ---
    def prepare(self, refs: list[Any]) -> list[PreparedImage]:
        """A request's images: each through the image gate, its adapter's encoder and projection."""
        if len(refs) > MAX_ADAPTERS:
            raise InputError(
                "ip_adapters", f"at most {MAX_ADAPTERS} IP-Adapter images per request ({len(refs)})"
            )
        return [self._prepare(ref, f"ip_adapters[{i}]") for i, ref in enumerate(refs)]

    def _prepare(self, ref: Any, field: str) -> PreparedImage:
        if ref.image is None:
            raise InputError(f"{field}.image", "an IP-Adapter needs an image")
        aid = self.resolve(str(ref.model), field)
        try:
            img = load(ref.image, f"{field}.image").image
        except ImageInputError as exc:
            raise InputError(exc.field, exc.message, exc.allowed) from exc
        a = self.adapters[aid]
        pixels = a.encoder.pixels(img)
        key = (aid, hashlib.sha256(pixels.numpy().tobytes()).hexdigest())
        with self._lock:
            tokens = self._tokens.get(key)
            if tokens is not None:
                self._tokens.move_to_end(key)
        if tokens is None:
            cond, uncond = a.encoder.embed(pixels, a.kind)
            with torch.inference_mode():
                tokens = a.proj(torch.cat([cond, uncond]).to(self.dtype))
            with self._lock:
                self._tokens[key] = tokens
                while len(self._tokens) > CACHE:
                    self._tokens.popitem(last=False)
        start, end = float(getattr(ref, "guidance_start", 0.0)), float(getattr(ref, "guidance_end", 1.0))
        if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
            raise InputError(f"{field}.guidance_start", "guidance_start and guidance_end must be in [0, 1]")
        return PreparedImage(aid, float(ref.weight), tokens[0], tokens[1], start, end)

    def rows(self, images: list[PreparedImage], n: int, uncond: bool) -> dict[str, Tensor]:
        tokens = torch.zeros(MAX_ADAPTERS, MAX_TOKENS, self.cross_dim, dtype=self.dtype, device=self.device)
        inf = float("inf")
        table = torch.tensor([[-1.0, 0.0, 0.0, 1.0, 0.0, -inf, inf]] * MAX_ADAPTERS, device=self.device)
        for i, p in enumerate(images):
            t = p.uncond if uncond else p.cond
            tokens[i, : t.shape[0]] = t
            # the window is the whole schedule until bind_schedule reads start / end against the sigmas
            table[i, :4] = torch.tensor([float(p.adapter), p.weight, p.start, p.end])
        return {TOKENS: tokens.expand(n, -1, -1, -1).clone(), UNIT: table.expand(n, -1, -1).clone()}

    @staticmethod
    def bind_schedule(rows: dict[str, Tensor], sigmas: Tensor, sigma_to_t: Any) -> None:
        """guidance_start / guidance_end -> each slot's timestep window, by sd-webui-controlnet's rule
        for every unit (step i acts when start <= i / steps <= end): the table has the ControlNet unit
        table's columns, so ControlNet's binding does it."""
        if UNIT in rows:
            ControlSet.bind_schedule({CONTROL_UNIT: rows[UNIT]}, sigmas, sigma_to_t)

    def add_rows(
        self, refs: list[Any], n: int, cond: dict[str, Tensor], uncond: dict[str, Tensor] | None
    ) -> None:
        """A request's images into its ``n`` cond rows (and uncond rows, with the unconditional tokens)."""
        prepared = self.prepare(refs)
        cond.update(self.rows(prepared, n, uncond=False))
        if uncond is not None:
            uncond.update(self.rows(prepared, n, uncond=True))

    # --- the model call ---
    def bind(self, tokens: Tensor | None, unit: Tensor | None, t: Tensor) -> AbstractContextManager[None]:
        """The image rows of one UNet call at timesteps ``t`` (nothing when no row has an active adapter)."""
        if tokens is None or unit is None:
            return nullcontext()
        ids = unit[..., 0]
        tt = t.reshape(-1).expand(unit.shape[0]).float().to(unit.device)[:, None]
        active = (ids >= 0) & (unit[..., 1] != 0) & (tt > unit[..., 5]) & (tt <= unit[..., 6])
        if not bool(active.any()):
            return nullcontext()
        groups = []
        for aid in sorted({int(v) for v in ids[active].tolist()}):
            rows, slots = torch.nonzero(active & (ids == aid), as_tuple=True)
            a = self.adapters[aid]
            groups.append(Group(rows, tokens[rows, slots, : a.tokens], unit[rows, slots, 1], a.layers))
        return image_rows(groups)

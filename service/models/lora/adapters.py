"""The LoRAs of the store and of one loaded model.

:class:`LoraIndex` finds ``.safetensors`` files in ``<store>/loras/`` (any model) and
``<store>/<model>/loras/`` (that model). :class:`ModelAdapters` applies them to one loaded model:
UNet LoRAs per row in shared model calls (the rows' adapters ride in the conditioning under
:data:`KEY`, ``[rows, 2 * MAX_PER_REQUEST]``: adapter id and weight pairs, id -1 = none), text-encoder
LoRAs while that request's prompt is encoded.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from service.models.file_names import model_folders, usable_name

from .formats import LoraFormatError, read_lora
from .layers import Plan, Prepared, RowLora

KEY = "lora"
MAX_PER_REQUEST = 4


def live(rows: Tensor | None) -> bool:
    """Whether a call's per-row adapter tensor gives any row an adapter with a non-zero weight."""
    if rows is None or rows.numel() == 0:
        return False
    pairs = rows.reshape(rows.shape[0], -1, 2)
    return bool(((pairs[..., 0] >= 0) & (pairs[..., 1] != 0)).any())


class LoraError(ValueError):
    """A LoRA a request cannot use: unknown, unreadable, or for another base model."""

    def __init__(self, message: str, allowed: list[str] | None = None) -> None:
        super().__init__(message)
        self.message, self.allowed = message, allowed


@dataclass(frozen=True)
class LoraInfo:
    name: str
    path: Path
    base_model: str | None  # the model folder it sits in; None: the shared loras/ folder
    size_bytes: int
    mtime_ns: int = 0

    @property
    def version(self) -> tuple[Path, int, int]:
        """The file as it is now: a file rewritten in place (a new training run saved under the
        same name, as kohya's trainer does) is a new version, read again (A1111 compares mtimes)."""
        return self.path, self.mtime_ns, self.size_bytes


class LoraIndex:
    """LoRA files in the store (rescanned on each lookup: new files appear without a restart)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def scan(self) -> list[LoraInfo]:
        out = []
        folders: list[tuple[Path, str | None]] = [(self.root / "loras", None)]
        if self.root.is_dir():
            folders += [(d / "loras", d.name) for d in model_folders(self.root)]
        for folder, base in folders:
            if folder.is_dir():
                for f in sorted(folder.glob("*.safetensors")):
                    if usable_name(f.stem) and f.is_file():
                        st = f.stat()
                        out.append(LoraInfo(f.stem, f, base, st.st_size, st.st_mtime_ns))
        return out

    def for_model(self, model: str) -> dict[str, LoraInfo]:
        """The LoRAs a model may use by name (its own folder's win over the shared ones)."""
        found: dict[str, LoraInfo] = {}
        for info in self.scan():
            if info.base_model is None:
                found.setdefault(info.name, info)
            elif info.base_model == model:
                found[info.name] = info
        return found


class ModelAdapters:
    """Per-row LoRA for one loaded model: its UNet (per row) and text encoders (per request)."""

    def __init__(
        self,
        model: str,
        index: LoraIndex,
        unet: nn.Module,
        text_encoders: dict[str, nn.Module],
        traced: Any = None,
        reserve: Callable[[int], None] | None = None,
    ) -> None:
        self.model, self.index = model, index
        # the memory budget (LoadedModel.reserve_memory): each LoRA read counts in its model's
        # footprint (a Flux LoRA can be hundreds of MB), or the pool refuses it (507)
        self.reserve = reserve
        self.parts = {"unet": RowLora(unet), **{c: RowLora(m, text=True) for c, m in text_encoders.items()}}
        self.traced = traced  # a TracedModule to bypass while rows have adapters (hooks need eager)
        # by file version; an older version's entry stays (rows in flight may still name its id)
        self._ids: dict[tuple[Path, int, int], int] = {}
        self._adapters: list[dict[str, Prepared]] = []  # id -> component -> prepared layers
        self._lock = threading.Lock()

    def available(self) -> list[str]:
        return sorted(self.index.for_model(self.model))

    def resolve(self, loras: list[tuple[str, float]]) -> list[tuple[int, float]]:
        """Adapter ids for (name, weight) pairs, loading and checking each file once (LoraError)."""
        if len(loras) > MAX_PER_REQUEST:
            raise LoraError(f"at most {MAX_PER_REQUEST} LoRAs per request, got {len(loras)}")
        known = self.index.for_model(self.model)
        out = []
        for name, weight in loras:
            info = known.get(name)
            if info is None:
                raise LoraError(f"unknown LoRA {name!r} for model {self.model!r}", sorted(known))
            out.append((self._load(info), float(weight)))
        return out

    def _load(self, info: LoraInfo) -> int:
        with self._lock:
            if info.version in self._ids:
                return self._ids[info.version]
            if self.reserve is not None:  # its prepared layers are about the file's size
                self.reserve(info.size_bytes)
            try:
                layers, _, _ = read_lora(info.path)
                prepared = {}
                for comp, comp_layers in layers.items():
                    part = self.parts.get(comp)
                    if part is None:
                        raise LoraFormatError(f"{info.name}: model {self.model!r} has no {comp}")
                    prepared[comp] = part.prepare(comp_layers, f"LoRA {info.name!r}")
            except Exception as exc:
                if self.reserve is not None:
                    self.reserve(-info.size_bytes)  # nothing of it stays
                if isinstance(exc, LoraFormatError):
                    raise LoraError(f"LoRA {info.name!r} does not fit model {self.model!r}: {exc}") from exc
                raise
            self._ids[info.version] = len(self._adapters)
            self._adapters.append(prepared)
            return self._ids[info.version]

    @staticmethod
    def encode(resolved: list[tuple[int, float]], n: int) -> Tensor:
        """The per-row conditioning tensor of a request: ``[n, 2 * MAX_PER_REQUEST]``."""
        row = torch.tensor([-1.0, 0.0] * MAX_PER_REQUEST)
        for i, (ident, weight) in enumerate(resolved):
            row[2 * i], row[2 * i + 1] = float(ident), weight
        return row.expand(n, -1).clone()

    def _plan(self, rows: Tensor, comp: str, gather: bool = True) -> Plan | None:
        """The adapters of ``comp`` that some row uses, each row's weights over their rank columns (an
        adapter twice in a row: its weights add), and per-row slots when there are several; None when
        no row has one."""
        pairs = rows.detach().float().cpu().view(rows.shape[0], -1, 2)
        ids, weights = pairs[..., 0].long(), pairs[..., 1]
        used: list[Prepared] = []
        per_rows = []
        for ident in sorted(set(ids.flatten().tolist()) - {-1}):
            prepared = self._adapters[ident].get(comp)
            per_row = torch.where(ids == ident, weights, 0.0).sum(1)
            if prepared is None or not bool((per_row != 0).any()):
                continue
            used.append(prepared)
            per_rows.append(per_row)
        if not used:
            return None
        scales = torch.cat([w[:, None].expand(-1, a.rank) for a, w in zip(used, per_rows, strict=True)], 1)
        if len(used) == 1 or not gather:
            return Plan(used, scales)
        w = torch.stack(per_rows, 1)  # [rows, k]
        m = max(1, int((w != 0).sum(1).max()))
        order = torch.argsort((w == 0).to(torch.int8), dim=1, stable=True)[:, :m]  # each row's adapters first
        picked = torch.gather(w, 1, order)
        slots = torch.where(picked != 0, order + 1, 0)
        r = max(a.rank for a in used)
        return Plan(used, scales, slots, picked.repeat_interleave(r, dim=1))

    def call(self, rows: Tensor) -> AbstractContextManager[None]:
        """The engine's hook around one UNet call of ``rows.shape[0]`` rows."""
        plan = self._plan(rows, "unet")
        if plan is None:
            return nullcontext()
        return self._active(plan, rows.shape[0])

    @contextmanager
    def _active(self, plan: Plan, batch: int) -> Iterator[None]:
        if self.traced is not None:
            self.traced.bypass = True
        try:
            with self.parts["unet"].rows(plan, batch):
                yield
        finally:
            if self.traced is not None:
                self.traced.bypass = False

    @contextmanager
    def text(self, resolved: list[tuple[int, float]]) -> Iterator[tuple[Any, ...] | None]:
        """Text-encoder LoRAs of one request while this thread encodes its prompts; yields a cache key
        for the encodings (None: no text LoRA, the plain encodings apply)."""
        rows = self.encode(resolved, 1)
        with ExitStack() as stack:
            key: list[Any] = []
            for comp, part in self.parts.items():
                plan = None if comp == "unet" else self._plan(rows, comp, gather=False)
                if plan is not None:
                    stack.enter_context(part.rows(plan, 0))
                    key.append(comp)
            yield (tuple(resolved), *key) if key else None

    def close(self) -> None:
        for part in self.parts.values():
            part.remove()
        self._adapters.clear()
        self._ids.clear()


def attach(model: Any, index: LoraIndex) -> ModelAdapters | None:
    """Per-row LoRA support for a loaded model (Stable Diffusion, SD3 / Flux or the project's UNet), set as
    ``model.adapters``; None for a model with neither."""
    from service.models.compiled import inner_attribute

    sd = getattr(model, "text_model", None)
    traced = None
    if sd is not None:
        names = ("text_encoder", "text_encoder_2")
        encoders = sd.components.text_encoders
        if isinstance(encoders, dict):  # SD3 / Flux: by model_index name (text_encoder_3, T5: no LoRA)
            texts = {n: encoders[n] for n in names if n in encoders}
        else:
            texts = dict(zip(names, encoders, strict=False))
        unet = sd.unet if sd.unet is not None else getattr(sd, "transformer", None)  # SD3 / Flux
        wrapper = getattr(model.denoiser, inner_attribute(model.denoiser) or "inner_model", None)
        traced = wrapper if hasattr(wrapper, "bypass") else None  # a compiled network: hooks need eager
    else:
        unet, texts = getattr(model.denoiser, "inner_model", None), {}
        if unet is not None and hasattr(unet, "bypass"):  # Traced/CompiledModule: hooks need the eager UNet
            traced, unet = unet, unet.inner
    if not isinstance(unet, nn.Module):
        return None
    model.adapters = ModelAdapters(model.name, index, unet, texts, traced, model.reserve_memory)
    return model.adapters  # type: ignore[no-any-return]


@contextmanager
def text_loras(model: Any, resolved: list[tuple[int, float]]) -> Iterator[None]:
    """Encode this thread's prompts for ``model`` with the request's text-encoder LoRAs (and a cache
    key of their own)."""
    sd, adapters = getattr(model, "text_model", None), getattr(model, "adapters", None)
    if not resolved or sd is None or adapters is None:
        yield
        return
    with adapters.text(resolved) as key:
        sd.text.variant.key = key
        try:
            yield
        finally:
            sd.text.variant.key = None

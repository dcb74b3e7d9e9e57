"""ControlNet units per request, per row, in shared UNet calls.

A request's units ride in its conditioning rows, so rows with different ControlNets, different
control images or none share one UNet call (the scheduler groups rows by conditioning keys and
shapes, and every row of a model whose store has ControlNets carries both keys):

- :data:`HINT` ``[rows, MAX_UNITS, 4, H, W]`` uint8: each unit's control image (RGB) and its
  effective-region mask (255 = everywhere) at the generation size;
- :data:`UNIT` ``[rows, MAX_UNITS, 9]`` float: ControlNet id (-1: empty slot), weight,
  guidance_start, guidance_end, 1 for soft injection, the timestep window ``(t_lo, t_hi]`` in
  which it acts (the whole schedule until :meth:`ControlSet.bind_schedule` sets it), and for a
  union ControlNet (``union.py``) the slot's control type (-1: auto) and its unit's number: a union
  unit with several control images takes a slot per image, all with the unit's number.

:meth:`ControlSet.staged` runs, per ControlNet used by some active row, ONE call over all the
(row, unit) pairs that use it (their control images concatenated), scales each pair's outputs
by its weight (soft injection: ``0.825 ** (12 - i)`` for output i, as sd-webui-controlnet), masks
them, and sums them per row; rows without an active unit add zero. Control modes (the extension's
``soft_injection = mode != Balanced``, ``cfg_injection = mode == ControlNet is more important``:
then the unit acts on the cond rows only) and guidance_start / guidance_end (the extension's rule:
step i acts when ``start <= i / steps <= end``) are settled per row when the job is built:
:meth:`bind_schedule` turns the step window into the row's timestep window from its own sigmas.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from service.image_gate import ImageInputError, load
from service.sampling.errors import InputError

from . import files, preprocess
from .annotator_cache import Device
from .net import ControlNet, Stage
from .union import AUTO, Deep, UnionControlNet, control_type, union_call

HINT, UNIT = "control_hint", "control_unit"
MAX_UNITS = 3  # sd-webui-controlnet's default unit count
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
MODE_ALIASES = {"balanced": 0, "prompt": 1, "control": 2}


def _index(value: Any, names: tuple[str, ...], aliases: dict[str, int], field: str) -> int:
    """A mode given as its A1111 name (any case), one of our short names, or its index."""
    if isinstance(value, bool):
        value = None
    if isinstance(value, int) and 0 <= value < len(names):
        return value
    if isinstance(value, str):
        low = value.strip().lower()
        for i, n in enumerate(names):
            if low == n.lower():
                return i
        if low in aliases:
            return aliases[low]
        if low.isdigit() and int(low) < len(names):
            return int(low)
    raise InputError(
        field, f"{field} must be one of {list(names)} (or 0-{len(names) - 1}); got {value!r}", list(names)
    )


def control_mode(value: Any, field: str = "controlnets.control_mode") -> int:
    return _index(value, CONTROL_MODES, MODE_ALIASES, field)


def resize_mode(value: Any, field: str = "controlnets.resize_mode") -> int:
    aliases = {
        "just_resize": 0,
        "crop_and_resize": 1,
        "resize_and_fill": 2,
        "inner_fit": 1,
        "outer_fit": 2,
        "envelope (outer fit)": 2,
        "scale to fit (inner fit)": 1,
        # the extension's older names (external_code.resize_mode_aliases); 3 is its "Just Resize
        # (Latent upscale)", which its resize_mode_from_value reads as Just Resize
        "inner fit (scale to fit)": 1,
        "outer fit (shrink to fit)": 2,
        "just resize (latent upscale)": 0,
        "3": 0,
    }
    if value == 3 and not isinstance(value, bool):
        value = 0
    return _index(value, preprocess.RESIZE_MODES, aliases, field)


@dataclass
class PreparedUnit:
    net: int
    weight: float
    start: float
    end: float
    mode: int
    hint: Tensor  # [4, H, W] uint8
    kind: int = AUTO  # a union ControlNet's control type for this image (union.py)
    group: int = -1  # the unit's number: a union unit's images share it


def control_image(
    unit: Any, height: int, width: int, field: str, root: Path | None = None, device: Device = None
) -> Tensor:
    """A unit's control image through the image gate, its preprocessor and its resize mode:
    [4, H, W] uint8 (RGB and the effective-region mask); ``root``: the store (model-based modules),
    ``device``: where their networks run (the model's)."""
    module = preprocess.module_name(str(getattr(unit, "module", None) or "none"), root)
    if module is None:
        raise InputError(
            f"{field}.module", f"unknown preprocessor {unit.module!r}", sorted(preprocess.modules(root))
        )
    mode = resize_mode(getattr(unit, "resize_mode", 1), f"{field}.resize_mode")
    if unit.image is None:
        raise InputError(f"{field}.image", "a ControlNet unit needs an image")
    try:
        img = np.asarray(load(unit.image, f"{field}.image").image.convert("RGB"))
        mask_data = getattr(unit, "mask", None)
        mask = None if mask_data is None else np.asarray(load(mask_data, f"{field}.mask").image.convert("L"))
    except ImageInputError as exc:
        raise InputError(exc.field, exc.message, exc.allowed) from exc
    res = getattr(unit, "processor_res", None)
    if getattr(unit, "pixel_perfect", False):
        res = preprocess.pixel_perfect_resolution(img.shape[0], img.shape[1], height, width, mode)
    if module != "none":
        res = None if res is None or int(res) <= 0 else min(int(res), 2048)
        a, b = getattr(unit, "threshold_a", None), getattr(unit, "threshold_b", None)
        img = preprocess.run(module, img, res, a, b, root, field=f"{field}.module", device=device)
    rgb = preprocess.fit(img, width, height, mode)
    m = (
        np.full((height, width), 255, np.uint8)
        if mask is None
        else preprocess.fit(np.repeat(mask[:, :, None], 3, 2), width, height, 0)[:, :, 0]
    )
    return torch.from_numpy(np.concatenate([rgb, m[:, :, None]], axis=2).copy()).permute(2, 0, 1)


class ControlSet:
    """The ControlNets one loaded SD model uses: loaded on first use and kept (ids are stable)."""

    def __init__(
        self,
        root: Path,
        unet_config: Any,
        device: torch.device,
        dtype: torch.dtype,
        model: str,
        reserve: Callable[[int], None] | None = None,
    ) -> None:
        self.root, self.unet_config, self.device, self.dtype, self.model = (
            root,
            unet_config,
            device,
            dtype,
            model,
        )
        # the memory budget (LoadedModel.reserve_memory): a ControlNet's bytes count in its model's
        self.reserve = reserve
        self.nets: list[ControlNet] = []
        self._ids: dict[Path, int] = {}
        self._lock = threading.Lock()

    def available(self) -> dict[str, files.ControlNetFile]:
        return files.scan(self.root)

    def resolve(self, name: str, field: str) -> int:
        known = self.available()
        key = name.strip()
        if key not in known and key.endswith("]") and " [" in key:
            key = key.rsplit(" [", 1)[0]  # A1111 lists "name [hash]"
        info = known.get(key)
        if info is None:
            raise InputError(f"{field}.model", f"unknown ControlNet {name!r}", sorted(known))
        with self._lock:
            if info.path in self._ids:
                return self._ids[info.path]
            net = self._load(info, field, sorted(known))
            self._ids[info.path] = len(self.nets)
            self.nets.append(net)
            return self._ids[info.path]

    def _load(self, info: files.ControlNetFile, field: str, known: list[str]) -> ControlNet:
        """Load a ControlNet within the memory budget: its file's size is reserved first (the pool
        evicts idle models or refuses), then corrected to the bytes it holds once loaded."""
        self._check_kind(info, field, known)
        need = files.size(info)
        if self.reserve is not None:
            self.reserve(need)
        held = 0
        try:
            net = self._build(info)
            self._check_base(net, info.name, field)
            held = files.held_bytes(net)
        except files.ControlNetError as exc:
            raise InputError(f"{field}.model", str(exc), known) from exc
        finally:
            if self.reserve is not None:
                self.reserve(held - need)
        return net

    def _check_kind(self, info: files.ControlNetFile, field: str, known: list[str]) -> None:
        """Before reading its weights: a Flux ControlNet (flux_units.py) does not fit a UNet."""
        if files.kind(info) == "flux":
            raise InputError(
                f"{field}.model",
                f"ControlNet {info.name!r} is for Flux, but model {self.model!r} is "
                f"{files.family(dict(self.unet_config))}",
                known,
            )

    def _build(self, info: files.ControlNetFile) -> Any:
        return files.load(info, self.device, self.dtype)

    def held_bytes(self) -> int:
        """The bytes the loaded ControlNets hold."""
        return sum(files.held_bytes(n) for n in self.nets)

    def _check_base(self, net: ControlNet, name: str, field: str) -> None:
        u, c = self.unet_config, net.cfg
        same = (
            int(u.cross_attention_dim) == c.cross_attention_dim
            and tuple(u.block_out_channels) == tuple(c.block_out_channels)
            and (u.addition_embed_type == "text_time") == c.is_sdxl
            and int(u.layers_per_block) == c.layers_per_block
        )
        if not same:
            raise InputError(
                f"{field}.model",
                f"ControlNet {name!r} is for {files.family(c)}, but model {self.model!r} is "
                f"{files.family(dict(u))}",
            )

    # --- building a request's rows ---
    def prepare(self, units: list[Any], height: int, width: int) -> list[PreparedUnit]:
        slots = sum(1 + len(getattr(u, "images", None) or ()) - (u.image is None) for u in units)
        if len(units) > MAX_UNITS or slots > MAX_UNITS:
            raise InputError(
                "controlnets",
                f"at most {MAX_UNITS} ControlNet units per request (a union unit's images count one "
                f"each), got {max(len(units), slots)}",
            )
        out: list[PreparedUnit] = []
        for i, unit in enumerate(units):
            field = f"controlnets[{i}]"
            start, end = float(unit.guidance_start), float(unit.guidance_end)
            if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
                raise InputError(
                    f"{field}.guidance_start", "guidance_start and guidance_end must be in [0, 1]"
                )
            mode = control_mode(unit.control_mode, f"{field}.control_mode")
            net = self.resolve(str(unit.model), field)
            for image, kind, where in self._images(unit, net, field):
                hint = control_image(image, height, width, where, self.root, self.device)
                out.append(PreparedUnit(net, float(unit.weight), start, end, mode, hint, kind, i))
        return out

    def _images(self, unit: Any, net_id: int, field: str) -> list[tuple[Any, int, str]]:
        """A unit's control images with their control types and the field each is named by: the
        unit's ``image`` (its ``control_type``) then each of ``images`` (union ControlNets only; a
        type is read for union ControlNets, as sd-webui-controlnet ignores it for the others)."""
        net, more = self.nets[net_id], list(getattr(unit, "images", None) or ())
        if not isinstance(net, UnionControlNet):
            if more:
                raise InputError(f"{field}.images", f"ControlNet {unit.model!r} is not a union ControlNet")
            return [(unit, AUTO, field)]
        first = [] if unit.image is None and more else [(unit, getattr(unit, "control_type", None), field)]
        entries = first + [
            (replace(unit, image=e.image, module=e.module), e.control_type, f"{field}.images[{j}]")
            for j, e in enumerate(more)
        ]
        kinds = [(e, control_type(t, net.types, f"{f}.control_type"), f) for e, t, f in entries]
        untyped = [f for _, k, f in kinds if k == AUTO]
        if len(kinds) > 1 and untyped:
            raise InputError(
                f"{untyped[0]}.control_type",
                "each image of a union unit with several images needs a control type",
            )
        return kinds

    def rows(
        self, units: list[PreparedUnit], n: int, height: int, width: int, uncond: bool
    ) -> dict[str, Tensor]:
        """The two conditioning tensors for ``n`` rows (uncond rows: no unit in
        "ControlNet is more important" mode or on a global-pooling ControlNet, as the extension)."""
        hint = torch.zeros(MAX_UNITS, 4, height, width, dtype=torch.uint8)
        inf = float("inf")
        table = torch.tensor([[-1.0, 0.0, 0.0, 1.0, 0.0, -inf, inf, -1.0, -1.0]] * MAX_UNITS)
        for i, u in enumerate(units):
            if uncond and (u.mode == 2 or self.nets[u.net].cfg.global_pool_conditions):
                continue
            hint[i] = u.hint
            # the window is the whole schedule until bind_schedule reads start / end against the sigmas
            table[i, :5] = torch.tensor([float(u.net), u.weight, u.start, u.end, float(u.mode != 0)])
            table[i, 7:] = torch.tensor([float(u.kind), float(u.group)])
        return {HINT: hint.expand(n, -1, -1, -1, -1).clone(), UNIT: table.expand(n, -1, -1).clone()}

    @staticmethod
    def bind_schedule(cond: dict[str, Tensor], sigmas: Tensor, sigma_to_t: Any) -> None:
        """Step fractions -> the timestep window ``(t_lo, t_hi]`` of the steps i with
        ``start <= i / steps <= end`` (in place, from the fractions: binding again, as a second pass
        with its own sigmas does, is the same as binding once; no step: an empty window)."""
        table = cond.get(UNIT)
        if table is None:
            return
        steps = len(sigmas) - 1
        s = sigmas.detach().float().cpu()
        ts = sigma_to_t(s.clamp(min=1e-8)).float().cpu()
        for row in table.view(-1, table.shape[-1]):
            if row[0] < 0:
                continue
            start, end = float(row[2]), float(row[3])
            # the fractions were stored as float32: compare within its rounding
            active = [i for i in range(steps) if start - 1e-6 <= i / steps <= end + 1e-6]
            if not active:
                row[5], row[6] = float("inf"), float("-inf")
                continue
            first, last = active[0], active[-1]
            # the window opens at the first active step's sigma and closes above the next step's
            row[6] = float(ts[first]) + 1e-3 if first > 0 else float("inf")
            row[5] = float(ts[last + 1]) + 1e-3 if last + 1 < steps and s[last + 1] > 0 else float("-inf")

    # --- the model call ---
    def staged(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        hint: Tensor,
        unit: Tensor,
        extra: dict[str, Tensor | None],
        level: int = 1,
    ) -> StagedResiduals | None:
        """The summed residuals for each row in two parts (models/stepcache/sd_unet.StagedControl):
        the residuals of the skips 0 .. ``level`` now, for every row; the deeper ones when asked, for
        the rows asked (a UNet row whose step cache at that level holds needs the first ones only;
        ``full()``: all of them, for every row: (down residuals, mid residual)). Each ControlNet runs
        its layers to ``level`` once over all its (row, unit) pairs and its deeper layers once over
        the pairs of the rows asked (a union ControlNet's call items: union.py). None when no row has
        an active unit."""
        tt = t.reshape(-1).expand(x.shape[0]).float().to(unit.device)[:, None]
        ids = unit[..., 0]
        active = (ids >= 0) & (unit[..., 1] != 0) & (tt > unit[..., 5]) & (tt <= unit[..., 6])
        if not bool(active.any()):
            return None
        out = StagedResiduals(x.shape[0], level)
        for net_id in sorted({int(v) for v in ids[active].tolist()}):
            rows, slots = torch.nonzero(active & (ids == net_id), as_tuple=True)
            net = self.nets[net_id]
            h = hint[rows, slots].to(self.dtype) / 255
            ts = t.reshape(-1).expand(x.shape[0])
            deep: Deep
            if isinstance(net, UnionControlNet):  # a call item per (row, unit), weighted inside
                call = union_call(net, x, ts, context, h[:, :3], unit, rows, slots, extra, level)
                rows, slots, outs, deep = call
                h = hint[rows, slots].to(self.dtype) / 255
                weight = torch.ones(len(rows), dtype=outs[0].dtype, device=outs[0].device)
            else:
                picked = {k: (None if v is None else v[rows]) for k, v in extra.items()}
                outs, stage = net.start(x[rows], ts[rows], context[rows], h[:, :3], level, **picked)
                weight = unit[rows, slots, 1].to(outs[0].dtype)
                deep = _finished(net, stage)
            pairs = _Pairs(rows, weight, unit[rows, slots, 4].to(outs[0].dtype), h[:, 3:4], deep)
            out.shallow = pairs.add(out.shallow, outs, 0, x.shape[0])
            out.pairs.append(pairs)
        return out


def _finished(net: ControlNet, stage: Stage) -> Deep:
    return lambda pick: net.finish(stage if pick is None else stage.select(pick))


@dataclass
class _Pairs:
    """One ControlNet's (row, unit) pairs in a call: each pair's call row, weight, soft-injection
    flag and effective-region mask, and its deeper residuals for some pairs (``deep(pick)``)."""

    rows: Tensor
    weight: Tensor
    soft: Tensor
    mask: Tensor
    deep: Deep

    def add(
        self,
        total: list[Tensor],
        outs: list[Tensor],
        first: int,
        n: int,
        pick: tuple[Tensor, Tensor] | None = None,
    ) -> list[Tensor]:
        """``total`` (n rows, [] before the first ControlNet) plus the pairs' outputs ``first..``,
        each weighted (soft injection: ``0.825 ** (12 - i)`` for output i), masked and summed into
        its row; ``pick`` (pairs, their rows in ``total``): the outputs are those of some pairs only
        and ``total`` holds some rows only (:meth:`StagedResiduals.deep`)."""
        rows = self.rows if pick is None else pick[1]
        sel = slice(None) if pick is None else pick[0]
        weight, soft, mask = self.weight[sel], self.soft[sel], self.mask[sel]
        if not total:
            total = [torch.zeros(n, *o.shape[1:], dtype=o.dtype, device=o.device) for o in outs]
        for k, o in enumerate(outs):
            scale = weight * (soft * (0.825 ** float(12 - first - k)) + (1 - soft))
            r = o * scale.view(-1, 1, 1, 1)
            if not bool((mask == 1).all()):  # the effective region, at this resolution
                r = r * torch.nn.functional.interpolate(mask, size=o.shape[-2:], mode="area")
            total[k] = total[k].index_add(0, rows, r)
        return total


class StagedResiduals:
    """A call's summed residuals in two parts (:meth:`ControlSet.staged`)."""

    def __init__(self, n: int, level: int) -> None:
        self.n, self.level = n, level
        self.shallow: list[Tensor] = []
        self.pairs: list[_Pairs] = []

    def full(self) -> tuple[list[Tensor], Tensor]:
        """Every residual for every row: (down residuals, mid residual)."""
        deep = self.deep(None)
        assert deep is not None  # staged() returns None when no row has an active unit
        return self.shallow + deep[0], deep[1]

    def deep(self, index: Tensor | None) -> tuple[list[Tensor], Tensor] | None:
        """The deeper residuals for the rows ``index`` (None: all), summed per row in the order
        :meth:`full` sums them; None when none of those rows has a pair."""
        total: list[Tensor] = []
        for pairs in self.pairs:
            if index is None:
                total = pairs.add(total, pairs.deep(None), self.level + 1, self.n)
                continue
            where = torch.full((self.n,), -1, dtype=torch.long, device=pairs.rows.device)
            where[index.to(where.device)] = torch.arange(len(index), device=where.device)
            mapped = where[pairs.rows]
            pick = torch.nonzero(mapped >= 0).flatten()
            if len(pick):
                outs = pairs.deep(pick)
                total = pairs.add(total, outs, self.level + 1, len(index), (pick, mapped[pick]))
        return (total[:-1], total[-1]) if total else None

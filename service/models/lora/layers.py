"""Per-row LoRA on a module tree: the base layers run once for every row, then every row adds its own
low-rank update. Nothing is merged into the base weights, so one call can mix rows with different
adapters (or none).

For one call with adapters ``a_1..a_k`` (each padded to its rank ``r_i``, its ``alpha / rank`` folded
into its up matrix) each adapted layer concatenates their down and up matrices along the rank
(``D: [R, in]``, ``U: [out, R]``, ``R = sum r_i``; cached per adapter set) and adds

    delta = U (S * (D x))      with S[row] = [w_row,1 (r_1 times), ..., w_row,k (r_k times)]

the per-row weights of each adapter (0 where a row does not use it). That is two matmuls and a scale
per layer whatever the number of adapters or row groups (the S-LoRA / Punica idea, with the ranks
concatenated instead of gathered per row). Conv layers do the same with a conv (the base's kernel,
stride and padding) and a 1x1 conv.

The updates are added by forward hooks on the adapted ``nn.Linear`` / ``nn.Conv2d`` layers. The rows'
adapters are thread-local, set around one call with :meth:`RowLora.rows`: the engine's worker thread
and a request's text encoding in another thread do not see each other's.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.models.stepcache.state import bound_rows

from .formats import LoraFormatError, LoraWeight, flat
from .names import layers_per_block, sgm_name, text_name

CACHE_SETS = 8  # adapter sets whose concatenated matrices are kept per tree


@dataclass(eq=False)
class Prepared:
    """One adapter on one tree: per layer (down, up * alpha / rank), padded to ``rank``."""

    layers: dict[str, tuple[Tensor, Tensor]]
    rank: int


@dataclass(eq=False)
class Plan:
    """One call's adapters: ``scales`` ``[rows or 1, sum of ranks]`` (each row's weight of each adapter
    over its rank columns) and, for calls of several adapters, ``slots`` ``[rows, m]`` (1 + the index of
    each adapter a row uses, 0 = none) with ``slot_scales`` ``[rows, m * max rank]``."""

    adapters: list[Prepared]
    scales: Tensor
    slots: Tensor | None = None
    slot_scales: Tensor | None = None

    def select(self, index: Tensor) -> Plan:
        """The plan of rows ``index`` of its call (a step cache running part of the network on them)."""
        if self.scales.shape[0] == 1:
            return self
        pick = [
            None if t is None else t.index_select(0, index.to(t.device))
            for t in (self.slots, self.slot_scales)
        ]
        return Plan(self.adapters, self.scales.index_select(0, index.to(self.scales.device)), *pick)

    def to(self, device: torch.device, dtype: torch.dtype) -> Plan:
        slots = None if self.slots is None else self.slots.to(device)
        slot_scales = None if self.slot_scales is None else self.slot_scales.to(device, dtype)
        return Plan(self.adapters, self.scales.to(device, dtype), slots, slot_scales)


def _check(name: str, w: LoraWeight, base: nn.Module) -> str | None:
    if isinstance(base, nn.Linear):
        want_in, want_out, kernel = base.in_features, base.out_features, None
    else:
        assert isinstance(base, nn.Conv2d)
        want_in, want_out, kernel = base.in_channels, base.out_channels, tuple(base.kernel_size)
    got_in, got_out = int(w.down.shape[1]), int(w.up.shape[0])
    if (got_in, got_out) != (want_in, want_out):
        return f"layer {name!r} is {want_in}->{want_out}, the LoRA's is {got_in}->{got_out}"
    if kernel is None and w.down.dim() == 4 and tuple(w.down.shape[2:]) != (1, 1):
        return f"layer {name!r} is linear, the LoRA's down is a {tuple(w.down.shape[2:])} conv"
    if kernel is not None and w.down.dim() == 4 and tuple(w.down.shape[2:]) not in (kernel, (1, 1)):
        return f"layer {name!r} has kernel {kernel}, the LoRA's {tuple(w.down.shape[2:])}"
    if base.groups != 1 if isinstance(base, nn.Conv2d) else False:
        return f"layer {name!r} is a grouped conv"
    return None


def _shape(w: LoraWeight, base: nn.Module, rank: int) -> tuple[Tensor, Tensor]:
    """(down, up * scale) in the base layer's layout, zero-padded to ``rank``."""
    down, up = w.down.float(), w.up.float() * w.scale
    if isinstance(base, nn.Linear):
        down, up = down.flatten(1), up.flatten(1)
    else:
        assert isinstance(base, nn.Conv2d)
        if down.dim() == 2:
            down, up = down[:, :, None, None], up[:, :, None, None]
        kh, kw = base.kernel_size
        if tuple(down.shape[2:]) != (kh, kw):  # a 1x1 down on a kxk conv: centred in a kxk kernel
            if base.padding != (kh // 2, kw // 2) or kh % 2 == 0 or kw % 2 == 0:
                raise LoraFormatError("a 1x1 LoRA on a conv whose padding is not its kernel's half")
            full = down.new_zeros(down.shape[0], down.shape[1], kh, kw)
            full[:, :, kh // 2, kw // 2] = down[:, :, 0, 0]
            down = full
    pad = rank - down.shape[0]
    if pad:
        down = torch.cat([down, down.new_zeros(pad, *down.shape[1:])])
        up = torch.cat([up, up.new_zeros(up.shape[0], pad, *up.shape[2:])], dim=1)
    return down, up


class RowLora:
    """Per-row LoRA updates for one module tree (a UNet or, ``text=True``, a CLIP text encoder)."""

    def __init__(self, root: nn.Module, text: bool = False) -> None:
        self.text = text
        self.layers_per_block = None if text else layers_per_block(root)
        self.layers: dict[str, nn.Module] = {
            self._own(flat(n)): m for n, m in root.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)
        }
        param = next(root.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._local = threading.local()
        self._hooked: set[str] = set()
        self._handles: list[Any] = []
        self._cats: OrderedDict[tuple[int, ...], dict[str, tuple[Tensor, Tensor] | None]] = OrderedDict()
        self._lock = threading.Lock()

    def _own(self, name: str) -> str:
        return text_name(name) if self.text else name

    def resolve(self, name: str) -> str | None:
        """This tree's layer for a file's flat layer name (see :mod:`.names`); None: no such layer."""
        name = self._own(name)
        if name in self.layers:
            return name
        if self.layers_per_block is not None:
            mapped = sgm_name(name, self.layers_per_block)
            if mapped is not None and mapped in self.layers:
                return mapped
        return None

    def prepare(self, layers: dict[str, LoraWeight], where: str) -> Prepared:
        """The adapter checked against this tree (LoraFormatError naming the first layer that does not
        fit: a LoRA for another base model), on its device and dtype, with hooks on its layers."""
        mine: dict[str, LoraWeight] = {}
        for name, w in layers.items():
            own = self.resolve(name)
            if own is None:
                raise LoraFormatError(
                    f"{where}: the model has no layer {w.key or name!r} (a LoRA for another base model?)"
                )
            if own in mine:
                raise LoraFormatError(f"{where}: {mine[own].key!r} and {w.key!r} are the same layer")
            problem = _check(w.key or name, w, self.layers[own])
            if problem is not None:
                raise LoraFormatError(f"{where}: {problem} (a LoRA for another base model?)")
            mine[own] = w
        rank = max(w.rank for w in mine.values())
        out = {}
        for name, w in mine.items():
            try:
                down, up = _shape(w, self.layers[name], rank)
            except LoraFormatError as exc:
                raise LoraFormatError(f"{where}: layer {w.key or name!r}: {exc}") from exc
            out[name] = (down.to(self.device, self.dtype), up.to(self.device, self.dtype))
        for name in out:
            if name not in self._hooked:
                self._handles.append(self.layers[name].register_forward_hook(self._hook(name)))
                self._hooked.add(name)
        return Prepared(out, rank)

    @contextmanager
    def rows(self, plan: Plan, batch: int) -> Iterator[None]:
        """Apply ``plan`` to this thread's calls inside the block (``batch`` rows each; 0: any batch,
        with one row of scales for all)."""
        self._local.active = (plan.to(self.device, self.dtype), batch, self._concat(plan.adapters))
        try:
            with bound_rows(self._select):  # a step cache running the deep part on some rows only
                yield
        finally:
            self._local.active = None

    @contextmanager
    def _select(self, index: Tensor) -> Iterator[None]:
        active = self._local.active
        if active is None:
            yield
            return
        plan, batch, cats = active
        self._local.active = (plan.select(index), index.shape[0] if batch else 0, cats)
        try:
            yield
        finally:
            self._local.active = active

    def _concat(self, adapters: list[Prepared]) -> dict[str, tuple[Tensor, Tensor] | None]:
        """Per layer, the adapters' down and up matrices concatenated along the rank (zeros for an
        adapter that does not adapt the layer); built lazily, kept for the last few adapter sets."""
        key = tuple(id(a) for a in adapters)
        with self._lock:
            cats = self._cats.get(key)
            if cats is None:
                cats = self._cats[key] = {}
                while len(self._cats) > CACHE_SETS:
                    self._cats.popitem(last=False)
            self._cats.move_to_end(key)
        return cats

    def _layer(
        self, name: str, adapters: list[Prepared], cats: dict[str, Any]
    ) -> tuple[Tensor, Tensor] | None:
        if name in cats:
            return cats[name]  # type: ignore[no-any-return]
        parts = [a.layers.get(name) for a in adapters]
        if all(p is None for p in parts):
            cats[name] = None
            return None
        ref = next(p for p in parts if p is not None)
        downs, ups = [], []
        for a, p in zip(adapters, parts, strict=True):
            if p is None:
                p = (
                    ref[0].new_zeros(a.rank, *ref[0].shape[1:]),
                    ref[1].new_zeros(ref[1].shape[0], a.rank, *ref[1].shape[2:]),
                )
            downs.append(p[0])
            ups.append(p[1])
        cats[name] = (torch.cat(downs), torch.cat(ups, dim=1))
        return cats[name]  # type: ignore[no-any-return]

    def _stacked(self, name: str, adapters: list[Prepared], cats: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """A linear layer's adapters stacked for per-row gathers: down ``[k + 1, r, in]`` and up
        transposed ``[k + 1, r, out]`` (entry 0 zeros; every adapter zero-padded to the largest rank)."""
        key = name + "/stacked"
        if key not in cats:
            down, up = cats[name]
            down, up = down.flatten(1), up.flatten(1)  # a 1x1 conv: a linear map over channels
            r = max(a.rank for a in adapters)
            ds, us = [down.new_zeros(r, down.shape[1])], [up.new_zeros(r, up.shape[0])]
            start = 0
            for a in adapters:
                d, u = down[start : start + a.rank], up[:, start : start + a.rank].T
                start += a.rank
                ds.append(torch.cat([d, d.new_zeros(r - a.rank, d.shape[1])]))
                us.append(torch.cat([u, u.new_zeros(r - a.rank, u.shape[1])]))
            cats[key] = (torch.stack(ds), torch.stack(us))
        return cats[key]  # type: ignore[no-any-return]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor | None:
            active = getattr(self._local, "active", None)
            if active is None:
                return None
            plan, batch, cats = active
            mats = self._layer(name, plan.adapters, cats)
            if mats is None:
                return None
            x = args[0]
            if batch and x.shape[0] != batch:
                raise RuntimeError(f"LoRA layer {name!r}: batch {x.shape[0]}, expected {batch} rows")
            if plan.slots is not None and isinstance(module, nn.Linear):
                down, up = self._stacked(name, plan.adapters, cats)
                return out + _gathered(down, up, x, plan.slots, plan.slot_scales)
            if plan.slots is not None and _pointwise(module):
                down, up = self._stacked(name, plan.adapters, cats)
                rows = x.flatten(2).transpose(1, 2)  # [B, H W, C]
                d = _gathered(down, up, rows, plan.slots, plan.slot_scales)
                return out + d.transpose(1, 2).reshape(out.shape)
            return out + _delta(module, mats[0], mats[1], x, plan.scales)

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._hooked.clear()
        self._cats.clear()


def _delta(base: nn.Module, down: Tensor, up: Tensor, x: Tensor, scales: Tensor) -> Tensor:
    x = x.to(down.dtype)
    if isinstance(base, nn.Linear):
        h = F.linear(x, down)
        h = h * scales.view(scales.shape[0], *([1] * (h.dim() - 2)), -1)
        return F.linear(h, up)
    assert isinstance(base, nn.Conv2d)
    h = F.conv2d(x, down, None, base.stride, base.padding, base.dilation)  # type: ignore[arg-type]
    h = h * scales[:, :, None, None]
    return F.conv2d(h, up)


def _gathered(down: Tensor, up_t: Tensor, x: Tensor, slots: Tensor, scales: Tensor | None) -> Tensor:
    """Per-row low-rank update with each row's own adapters only (batched matmuls over gathered
    per-row matrices, as Punica's BGMV): ``x [B, ..., in]`` -> ``[B, ..., out]``."""
    assert scales is not None
    b, m = slots.shape
    d = down[slots].view(b, m * down.shape[1], down.shape[2])  # [B, m r, in]
    u = up_t[slots].view(b, m * up_t.shape[1], up_t.shape[2])  # [B, m r, out]
    x3 = x.to(d.dtype).reshape(b, -1, x.shape[-1])
    h = torch.bmm(x3, d.transpose(1, 2)) * scales[:, None, :]
    return torch.bmm(h, u).view(*x.shape[:-1], u.shape[-1])


def _pointwise(m: nn.Module) -> bool:
    """A 1x1 conv with stride 1: a linear map over channels at each pixel."""
    return isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1) and tuple(m.stride) == (1, 1)

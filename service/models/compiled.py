"""Serve a denoiser's inner network through ``torch.compile`` (inductor), checked against eager.

Why: a compiled graph fuses the network's elementwise ops and skips the per-op Python dispatch
(the same win as the TorchScript trace of ``traced.py``, for every model family, and the path to
CUDA graphs on a GPU). ``dynamic=False`` makes one graph per input shape; to keep the number of
graphs a running service makes bounded, a call's rows are padded up to the next of a few bucket
sizes (copies of the last real row, as the engine's batch-invariant mode pads) and the real rows
sliced back. Each row of these networks is computed independently of the others, so padding never
changes a real row's result.

Each (input signature, bucket) graph is compared with the eager network on its first batch; any
compile error or mismatch logs a warning and that (signature, bucket) stays eager: compiling is an
optimisation, never a behaviour change. Training, grad mode, per-row LoRA hooks (``bypass``) and
ControlNet rows (a second network per row) always run eager.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from service.models.stepcache.spec import KEY as CACHE_KEY
from service.models.stepcache.state import live
from service.models.traced import Signature, _signature

log = logging.getLogger(__name__)

# Inductor reorders reductions: float32 results differ from eager only by rounding.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-9}
HALF_TOLERANCE = 2e-2  # float16 / bfloat16 networks
# ControlNet (SD: hint, Flux: latent) / IP-Adapter rows: eager
EAGER_KEYS = ("control_hint", "control_unit", "control_latent", "control_region", "ip_tokens", "ip_unit")


def default_buckets(max_rows: int) -> list[int]:
    """Powers of two up to ``max_rows``, and ``max_rows`` itself."""
    out, b = [], 1
    while b < max_rows:
        out.append(b)
        b *= 2
    return [*out, max_rows]


def raise_recompile_limit(graphs: int) -> None:
    """Let dynamo keep ``graphs`` graphs per compiled function (its default, 8, would fall back to
    eager silently past that)."""
    cfg: Any = torch._dynamo.config
    names = (
        "recompile_limit",
        "cache_size_limit",
        "accumulated_recompile_limit",
        "accumulated_cache_size_limit",
    )
    for name in names:
        if hasattr(cfg, name) and getattr(cfg, name) < graphs:
            setattr(cfg, name, graphs)


def pad_rows(
    args: Sequence[Tensor], kwargs: dict[str, Tensor], size: int
) -> tuple[list[Tensor], dict[str, Tensor]]:
    """Every input padded to ``size`` rows with copies of its last row."""
    rows = args[0].shape[0]
    if rows == size:
        return list(args), kwargs
    index = torch.cat([torch.arange(rows), torch.full([size - rows], rows - 1)])

    def pad(t: Tensor) -> Tensor:
        return t.index_select(0, index.to(t.device))

    return [pad(a) for a in args], {k: pad(v) for k, v in kwargs.items()}


class CompiledModule(nn.Module):
    """Runs ``inner(x, t, **cond)`` through ``torch.compile`` at bucketed row counts, eager as fallback."""

    def __init__(
        self,
        inner: nn.Module,
        buckets: Sequence[int],
        backend: str | Callable[..., Any] = "inductor",
        label: str = "model",
    ) -> None:
        super().__init__()
        if not buckets or min(buckets) < 1:
            raise ValueError(f"compile buckets must be positive row counts, got {list(buckets)!r}")
        self.inner = inner
        self.buckets = sorted(set(int(b) for b in buckets))
        self.label = label
        self.bypass = False  # run eager (per-row LoRA hooks are active for this call)
        self._graphs: dict[tuple[Signature, int], bool] = {}  # True: compiled and checked; False: eager
        self._lock = threading.Lock()  # one compile at a time (ahead-of-time and the engine's thread)
        raise_recompile_limit(8 * len(self.buckets))
        self._compiled: Any = None
        try:
            self._compiled = torch.compile(inner, backend=backend, dynamic=False)
        except Exception as exc:  # torch.compile itself refused (unsupported platform, bad backend)
            log.warning("%s: torch.compile failed, serving eager: %s", label, exc)

    def bucket(self, rows: int) -> int:
        """The smallest bucket holding ``rows`` (rows above the largest run in chunks of it)."""
        return next((b for b in self.buckets if b >= rows), self.buckets[-1])

    def forward(self, x: Tensor, t: Tensor, **kwargs: Tensor | None) -> Tensor:
        conds = {k: v for k, v in sorted(kwargs.items()) if v is not None}
        cached = conds.pop(CACHE_KEY, None)  # rows with a step cache take the eager network's split path
        if cached is not None and live(cached):
            return self.inner(x, t, **conds, **{CACHE_KEY: cached})  # type: ignore[no-any-return]
        if (
            self._compiled is None
            or self.bypass
            or torch.is_grad_enabled()
            or self.inner.training
            or any(k in conds for k in EAGER_KEYS)
        ):
            return self.inner(x, t, **conds)  # type: ignore[no-any-return]
        rows, top = x.shape[0], self.buckets[-1]
        if rows > top:  # chunks of the largest bucket: no graph beyond it
            parts = [
                self._run(x[i : i + top], t[i : i + top], {k: v[i : i + top] for k, v in conds.items()})
                for i in range(0, rows, top)
            ]
            return torch.cat(parts)
        return self._run(x, t, conds)

    def _run(self, x: Tensor, t: Tensor, conds: dict[str, Tensor]) -> Tensor:
        rows = x.shape[0]
        size = self.bucket(rows)
        (xp, tp), cp = pad_rows([x, t], conds, size)
        key = (_signature(x, conds), size)
        ok = self._graphs.get(key)
        if ok is None:
            ok = self._make(key, xp, tp, cp)
        if not ok:  # eager on the real rows alone: exactly what serving without compile gives
            return self.inner(x, t, **conds)  # type: ignore[no-any-return]
        return self._compiled(xp, tp, **cp)[:rows]  # type: ignore[no-any-return]

    def _make(self, key: tuple[Signature, int], x: Tensor, t: Tensor, conds: dict[str, Tensor]) -> bool:
        """Compile ``key``'s graph now and compare it with eager; False (with a warning) on any failure."""
        with self._lock:
            if key in self._graphs:
                return self._graphs[key]
            start = time.perf_counter()
            try:
                got = self._compiled(x, t, **conds)
                want = self.inner(x, t, **conds)
                if got.shape != want.shape:
                    raise RuntimeError(f"compiled gave shape {tuple(got.shape)}, eager {tuple(want.shape)}")
                tol = TOLERANCE.get(want.dtype, HALF_TOLERANCE)
                if not torch.allclose(got, want, rtol=tol, atol=tol):
                    raise RuntimeError(f"compiled differs from eager by {(got - want).abs().max():.3g}")
            except Exception as exc:
                log.warning(
                    "%s: compiling for inputs %s at %d rows failed, staying eager: %s",
                    self.label,
                    key[0],
                    key[1],
                    " ".join(f"{type(exc).__name__}: {exc}".split())[:400],  # dynamo's are multi-line
                )
                self._graphs[key] = False
                return False
            self._graphs[key] = True
            log.info("%s: compiled %d rows in %.1f s", self.label, key[1], time.perf_counter() - start)
            return True

    def precompile(self, x: Tensor, conds: dict[str, Tensor]) -> int:
        """Make every bucket's graph for the signature of one example row; the number that compiled."""
        made = 0
        conds = {
            k: v for k, v in sorted(conds.items()) if k not in (*EAGER_KEYS, CACHE_KEY) and v is not None
        }
        for i, size in enumerate(self.buckets, 1):
            log.info("%s: compiling bucket %d/%d (%d rows)", self.label, i, len(self.buckets), size)
            (xp,), cp = pad_rows([x[:1]], {k: v[:1] for k, v in conds.items()}, size)
            tp = torch.zeros(size, device=x.device, dtype=x.dtype)
            with torch.inference_mode():
                made += self._make((_signature(xp, cp), size), xp, tp, cp)
        return made


def inner_attribute(denoiser: nn.Module) -> str | None:
    """Where a denoiser keeps its network: ``inner_model`` (Karras and DDPM wrappers) or ``inner``
    (flow models), None if it has neither."""
    for name in ("inner_model", "inner"):
        if isinstance(getattr(denoiser, name, None), nn.Module):
            return name
    return None


def compile_denoiser(
    denoiser: nn.Module,
    buckets: Sequence[int],
    example: tuple[Tensor, dict[str, Tensor]] | None = None,
    label: str = "model",
    backend: str | Callable[..., Any] = "inductor",
) -> CompiledModule | None:
    """Wrap a denoiser's network in a CompiledModule (in place), compiling ``example``'s signature at
    every bucket now; None if the denoiser has no network to wrap."""
    name = inner_attribute(denoiser)
    if name is None:
        return None
    inner = getattr(denoiser, name)
    if isinstance(inner, CompiledModule):
        return inner
    wrapped = CompiledModule(inner, buckets, backend, label)
    setattr(denoiser, name, wrapped)
    if example is not None:
        start = time.perf_counter()
        made = wrapped.precompile(*example)
        log.info(
            "%s: %d/%d buckets compiled ahead in %.1f s",
            label,
            made,
            len(wrapped.buckets),
            time.perf_counter() - start,
        )
    return wrapped

"""Serve the project's UNet as a TorchScript trace, checked against eager before it is used.

Why: the engine calls the model in a worker thread while the event loop thread runs the HTTP
side. An eager PyTorch module re-acquires the GIL between every op, so each stretch of Python
on the event loop stalls the model call (on a 2-core box a busy Python thread cut the digits
UNet from ~280 to ~12 rows/s). A frozen trace runs its whole graph in C++ without the GIL, and
saves the per-op Python dispatch as well.

A trace is made per input signature (conditioning keys, trailing shapes, dtype, device) on the
first call that uses it, then compared with the eager module on that batch and on a batch of a
different size (a trace that baked in the batch size would fail there). Any trace error or
mismatch logs a warning and that signature stays eager: tracing is an optimisation, never a
behaviour change.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from service.models.stepcache.spec import KEY as CACHE_KEY
from service.models.stepcache.state import live

log = logging.getLogger(__name__)

# Frozen graphs may fuse ops; the results differ from eager only by float rounding.
RTOL, ATOL = 1e-4, 1e-5

Signature = tuple[object, ...]


def _signature(x: Tensor, kwargs: dict[str, Tensor]) -> Signature:
    conds = tuple((k, tuple(v.shape[1:]), v.dtype) for k, v in sorted(kwargs.items()))
    return (tuple(x.shape[1:]), x.dtype, x.device, conds)


def _other_batch(args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The same inputs with a different batch size: b + 1 rows (the first row repeated)."""
    return tuple(torch.cat([a, a[:1]]) for a in args)


class TracedModule(nn.Module):
    """Runs ``inner(x, c_noise, **cond)`` through a per-signature frozen trace, eager as fallback."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self._traces: dict[Signature, Any] = {}  # Signature -> ScriptModule, or None for "stay eager"
        self.bypass = False  # run eager (per-row LoRA hooks are active for this call)

    def forward(self, x: Tensor, c_noise: Tensor, **kwargs: Tensor | None) -> Tensor:
        conds = {k: v for k, v in sorted(kwargs.items()) if v is not None}  # fixed order: positional trace
        rows = conds.pop(CACHE_KEY, None)  # rows with a step cache take the eager network's split path
        if torch.is_grad_enabled() or self.inner.training or self.bypass or live(rows):
            if rows is not None:
                conds[CACHE_KEY] = rows
            return self.inner(x, c_noise, **conds)  # type: ignore[no-any-return]
        sig = _signature(x, conds)
        if sig not in self._traces:
            self._traces[sig] = self._trace(x, c_noise, conds)
        traced = self._traces[sig]
        if traced is None:
            return self.inner(x, c_noise, **conds)  # type: ignore[no-any-return]
        return traced(x, c_noise, *conds.values())  # type: ignore[no-any-return]

    def _trace(self, x: Tensor, c_noise: Tensor, conds: dict[str, Tensor]) -> Any:
        names = list(conds)
        inner = self.inner

        class Positional(nn.Module):  # trace needs positional inputs; keep the keyword names
            def __init__(self) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, x: Tensor, c_noise: Tensor, *cond: Tensor) -> Tensor:
                return self.inner(x, c_noise, **dict(zip(names, cond, strict=True)))  # type: ignore[no-any-return]

        args = (x, c_noise, *conds.values())
        eager = Positional().eval()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarnings and TorchScript deprecation notices
                traced = torch.jit.freeze(torch.jit.trace(eager, args, check_trace=False))
                for probe in (args, _other_batch(args)):
                    want, got = eager(*probe), traced(*probe)
                    if got.shape != want.shape:
                        raise RuntimeError(f"trace gave shape {tuple(got.shape)}, eager {tuple(want.shape)}")
                    if not torch.allclose(got, want, rtol=RTOL, atol=ATOL):
                        raise RuntimeError(f"trace differs from eager by {(got - want).abs().max():.3g}")
        except Exception as exc:
            log.warning("model trace for inputs %s failed, staying eager: %s", _signature(x, conds), exc)
            return None
        return traced


def trace_denoiser(denoiser: nn.Module, example: tuple[Tensor, dict[str, Tensor]] | None = None) -> bool:
    """Wrap a Karras denoiser's inner project UNet in a TracedModule (in place); False if it has none.

    ``example`` (x, cond) makes the trace for that signature now, so the first request is not slow.
    """
    from service.models.unet import UNet

    inner = getattr(denoiser, "inner_model", None)
    if not isinstance(inner, UNet):
        return False
    denoiser.inner_model = TracedModule(inner)
    if example is not None:
        x, cond = example
        with torch.inference_mode():
            denoiser(x, x.new_ones([x.shape[0]]), **cond)
    return True

"""Rectified-flow (flow-matching) models in the sampling core: SD3 / SD3.5 and Flux.

The model. A flow model is trained on x_t = (1 - t) x0 + t eps (t in [0, 1]) and predicts the
velocity v = eps - x0. We use ComfyUI's "CONST" form: the sampler's sigma *is* t, its x is x_t,
and the denoiser is D(x; t) = x - t v(x, t) (the x0 prediction). Then (x - D) / t = v, so the
probability-flow ODE dx/dt = v is k-diffusion's dx/dsigma = (x - D(x; sigma)) / sigma: every
deterministic sampler solves the flow ODE as it is, at its order (Euler is diffusers'
FlowMatchEulerDiscreteScheduler step exactly), and t = 1 (pure noise) is an ordinary sigma.

Samplers that add noise (ancestral, SDE, churn, CFG++) assume x = x0 + sigma n. Their flow forms
run the same stepper in the variance-exploding coordinates of the same process:

    sigma_ve = t / (1 - t),   x_ve = x_t / (1 - t)   (so x_ve = x0 + sigma_ve eps),

where x0 predictions are unchanged and a model evaluation at (x_ve, sigma_ve) is one at
(x_ve / (1 + sigma_ve), sigma_ve / (1 + sigma_ve)). t = 1 maps to sigma_ve = inf; the flow form
starts at t = 1 - 1e-4 (sigma_ve ~ 1e4) instead, and keeps its state in float64 so the first,
huge step loses nothing. See :func:`flow_stepper` and :class:`FlowSpec`.

Shift. SD3 trains on shifted times t = s u / (1 + (s - 1) u) (s = 3.0); Flux uses the same map
with s = exp(mu), mu linear in the number of latent patches (0.5 at 256, 1.15 at 4096:
:func:`flux_shift`). The denoiser's discrete table (what ``simple``, ``normal``, ``sgm_uniform``
use) and its range (``sigma_min`` = shift(1/1000), ``sigma_max`` = 1, what karras / beta /
exponential use) are shifted at the model's shift; schedule ``flow`` is the models' own
(diffusers'): a linear ramp in u through the shift, with the request's ``shift`` option, which
moves the whole schedule (its last time too, as in diffusers and ComfyUI).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from . import registry
from .catalog import SamplerInfo
from .errors import InputError
from .samplers.flow_forms import flow_info
from .schedules_flow import get_sigmas_flow, shift_time
from .spec import SamplingSpec, make_sigmas

TRAIN_STEPS = 1000


def flux_shift(
    seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Flux's resolution-dependent shift exp(mu), mu linear in the packed latent's token count."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return math.exp(base_shift + slope * (seq_len - base_seq_len))


@dataclasses.dataclass
class FlowSpec(SamplingSpec):
    """A SamplingSpec whose sampler runs in its flow form (same name, options and model calls)."""

    @property
    def info(self) -> SamplerInfo:
        return flow_info(registry.get_sampler(self.sampler), self.options)


def flow_spec(spec: SamplingSpec) -> FlowSpec:
    if isinstance(spec, FlowSpec):
        return spec
    return FlowSpec(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)})


class FlowDenoiser(nn.Module):
    """D(x; t) = x - t v(x, t) for a velocity network ``inner(x, t[B], **cond)`` (t in [0, 1]).

    ``shift``: the model's default shift; ``ramp_end``: where the models' own schedule's linear
    ramp in u ends before the schedule's shift is applied to it (SD3: 1/1000, the last time of its
    training table; None: 1/n, Flux's pipelines). See schedules_flow.get_sigmas_flow.
    """

    flow = True
    sigmas: Tensor

    def __init__(
        self,
        inner: Callable[..., Tensor],
        shift: float = 1.0,
        ramp_end: float | None = 1.0 / TRAIN_STEPS,
        dynamic: tuple[float, float, float, float] | None = None,
    ) -> None:
        super().__init__()
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift!r}")
        self.inner = inner
        self.shift = float(shift)
        self.dynamic = dynamic  # Flux: (base_seq_len, max_seq_len, base_shift, max_shift)
        u = torch.arange(1, TRAIN_STEPS + 1, dtype=torch.float64) / TRAIN_STEPS
        self.register_buffer(
            "sigmas", (self.shift * u / (1 + (self.shift - 1) * u)).float(), persistent=False
        )
        self.sigma_min, self.sigma_max, self.sigma_data = float(self.sigmas[0]), 1.0, 1.0
        if ramp_end is not None and not 0.0 < ramp_end < 1.0:
            raise ValueError(f"ramp_end must be in (0, 1) or None, got {ramp_end!r}")
        self.ramp_end = ramp_end

    def forward(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        v = self.inner(x, sigma, **cond)
        return x - sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) * v.to(x.dtype)

    def shift_for(self, height: int, width: int) -> float:
        """The shift at a latent size: Flux's resolution-dependent one (2x2 patches), else the model's."""
        if self.dynamic is None:
            return self.shift
        base_seq, max_seq, base_shift, max_shift = self.dynamic
        return flux_shift((height // 2) * (width // 2), int(base_seq), int(max_seq), base_shift, max_shift)

    def prepare(
        self, spec: SamplingSpec, x: Tensor, sigmas: Tensor, init: Tensor | None
    ) -> tuple[SamplingSpec, Tensor, Tensor]:
        """What a driver does for a flow model: the flow form of the spec's sampler, the schedule
        ``flow`` at Flux's shift for this latent size (unless the request gave one), and the
        img2img start (1 - t0) init + t0 noise (drivers make init + t0 noise)."""
        check_sigmas(sigmas, spec)
        spec = flow_spec(spec)
        if self.dynamic is not None and spec.schedule == "flow" and "shift" not in spec.schedule_options:
            spec.schedule_options = {**spec.schedule_options, "shift": self.shift_for(*x.shape[-2:])}
            new = make_sigmas(spec, self, sigmas.device).to(sigmas.dtype)
            noise = (x if init is None else x - init.to(x.dtype)) / sigmas[0].to(x.dtype)
            x, sigmas = noise * new[0].to(x.dtype) + (0 if init is None else init.to(x.dtype)), new
        if init is not None:
            x = x - sigmas[0].to(x.dtype) * init.to(x.dtype)
        return spec, sigmas, x


def check_sigmas(sigmas: Tensor, spec: SamplingSpec) -> None:
    if float(sigmas.max()) <= 1.0 + 1e-6:
        return
    if not isinstance(spec.schedule, str):
        field = "sigmas"
    else:
        field = "sigma_max" if "sigma_max" in spec.schedule_options else "schedule"
    raise InputError(
        field, f"flow-matching models take sigmas (times) in [0, 1]; got {float(sigmas.max()):.4g}"
    )


# --- the models' own schedule ---


__all__ = ["FlowDenoiser", "FlowSpec", "flow_spec", "flux_shift", "get_sigmas_flow", "shift_time"]

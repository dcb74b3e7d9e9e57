"""The stepper protocol shared by every sampler and by both drivers.

A stepper is a generator that yields an :class:`Eval` each time it needs the denoiser
D(x; sigma), is sent back the denoised prediction (same shape as ``Eval.x``), and finally
returns the sampled x. The direct driver (:func:`run`) answers each yield with one model
call; the engine answers the yields of many steppers with one batched call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from typing import Any, NamedTuple

import torch
from torch import Tensor


class Eval(NamedTuple):
    """One pending model evaluation: denoise ``x`` at noise level ``sigma`` (0-dim tensor)."""

    x: Tensor
    sigma: Tensor
    step: int


class Guided(NamedTuple):
    """What a driver sends a ``needs_uncond`` (CFG++) sampler: the guided and the unconditional prediction.

    Any stepper also accepts a plain tensor from a driver that has no separate uncond prediction
    (then ``uncond = denoised``, which makes a CFG++ sampler its plain counterpart).
    """

    denoised: Tensor
    uncond: Tensor


Stepper = Generator[Eval, Tensor, Tensor]
GuidedStepper = Generator[Eval, "Tensor | Guided", Tensor]
Model = Callable[..., Tensor]
GuidedModel = Callable[..., "Tensor | Guided"]  # a CFGDenoiser(return_uncond=True), for needs_uncond samplers
Callback = Callable[[dict[str, Any]], None]


class StepIO(NamedTuple):
    """What a driver hands a sampler's function besides x, sigmas and the options: the progress
    callback (k-diffusion's dict per step) and the noise sampler (``noise_sampler(sigma, sigma_next)``,
    for the samplers that draw noise). Registered steppers take them as keywords; see :mod:`.catalog`."""

    callback: Callback | None = None
    noise_sampler: Callable[[Tensor, Tensor], Tensor] | None = None


class NonFiniteError(FloatingPointError):
    """The model returned NaN or inf; the message names the step and sigma."""

    def __init__(self, step: int, sigma: float, what: str = "denoiser output") -> None:
        super().__init__(f"{what} is not finite (NaN or inf) at step {step}, sigma={sigma:.6g}")
        self.step = step
        self.sigma = sigma


def check_finite(denoised: Tensor | Guided, ev: Eval) -> None:
    """Raise NonFiniteError if ``denoised`` holds NaN/inf (one reduction, one sync)."""
    if isinstance(denoised, Guided):
        denoised = denoised.denoised + denoised.uncond
    acc = torch.float64 if denoised.dtype == torch.float64 else torch.float32
    if not math.isfinite(float(denoised.sum(dtype=acc))):
        raise NonFiniteError(ev.step, float(ev.sigma))


def run(stepper: Stepper, model: Model | GuidedModel, extra_args: dict[str, Any] | None = None) -> Tensor:
    """Drive a stepper with one model call per yield: ``model(x, sigma * ones(B), **extra_args)``."""
    extra_args = {} if extra_args is None else extra_args
    try:
        ev = next(stepper)
        s_in = ev.x.new_ones([ev.x.shape[0]])
        while True:
            if s_in.shape[0] != ev.x.shape[0] or s_in.dtype != ev.x.dtype:
                s_in = ev.x.new_ones([ev.x.shape[0]])
            denoised = model(ev.x, ev.sigma * s_in, **extra_args)
            check_finite(denoised, ev)
            ev = stepper.send(denoised)  # type: ignore[arg-type]  # a Guided goes to needs_uncond steppers
    except StopIteration as stop:
        return stop.value

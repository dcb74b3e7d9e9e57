"""Helpers the steppers share: the callback report, noise draws, Karras churn, option checks.

A sampler function ``name(x, sigmas, io, *, **options)`` (``io``: a StepIO with the callback and
the noise sampler; the families below write it once for their members, whose step is all they add)
yields an :class:`~service.sampling.stepper.Eval` per model evaluation and returns the final x, in
k-diffusion's variance-exploding form x = x0 + sigma * n, with ``x`` already scaled to
``sigmas[0]``. Noise levels are handled as Python floats (``s = sigmas.tolist()``) and scalar
factors are folded before they touch x: the same formulas as k-diffusion with fewer tensor
operations, which is where a sampler's own time goes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from typing import Any

import torch
from torch import Tensor

from ..catalog import family
from ..errors import InputError
from ..noise import BrownianNoiseSampler, NoiseSampler, default_noise_sampler
from ..stepper import Callback, Eval, Guided, StepIO, Stepper

# One step of a family's loop: the new x, or a generator (it evaluates the model again) returning it;
# the loop runs it inline (no extra generator layer per step: the sampler's own time is in this loop).
StepResult = Tensor | Generator[Eval, Any, Tensor]


def check_order(name: str, value: int, hi: int) -> int:
    """A multistep solver's order option as an int in [1, hi] (booleans and fractions refused)."""
    if isinstance(value, bool) or int(value) != value or not 1 <= value <= hi:
        raise InputError(name, f"{name} must be an integer in [1, {hi}], got {value!r}")
    return int(value)


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step, as k-diffusion's get_ancestral_step, in floats."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def report(
    callback: Callback | None, x: Tensor, i: int, sigmas: Tensor, sigma_hat: float, denoised: Tensor
) -> None:
    if callback is not None:
        sigma = sigmas[i]
        callback(
            {"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma.new_tensor(sigma_hat), "denoised": denoised}
        )


def noise_at(noise_sampler: NoiseSampler, sigmas: Tensor, sigma: float, sigma_next: float) -> Tensor:
    # Noise samplers get tensors, like k-diffusion's (a Brownian tree keys on their exact values).
    return noise_sampler(sigmas.new_tensor(sigma), sigmas.new_tensor(sigma_next))


def churn(
    x: Tensor,
    sigmas: Tensor,
    s: list[float],
    i: int,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
    noise_sampler: NoiseSampler | None,
) -> tuple[Tensor, float]:
    """Karras 'churn': raise the noise level to sigma_hat = sigma * (1 + gamma) by adding noise."""
    gamma = min(s_churn / (len(s) - 1), 2**0.5 - 1) if s_tmin <= s[i] <= s_tmax else 0.0
    sigma_hat = s[i] * (gamma + 1)
    if gamma > 0:
        eps = (
            torch.randn_like(x) if noise_sampler is None else noise_at(noise_sampler, sigmas, s[i], sigma_hat)
        )
        x = x + eps * (s_noise * (sigma_hat**2 - s[i] ** 2) ** 0.5)
    return x, sigma_hat


def brownian(x: Tensor, sigmas: Tensor, noise_sampler: NoiseSampler | None) -> NoiseSampler:
    if noise_sampler is not None:
        return noise_sampler
    positive = sigmas[sigmas > 0]
    if positive.numel() == 0:
        return default_noise_sampler(x)  # never called: nothing to sample
    return BrownianNoiseSampler(x, positive.min(), sigmas.max())


def check_nonneg(**values: float) -> None:
    for name, v in values.items():
        if not math.isfinite(float(v)) or float(v) < 0:
            raise InputError(name, f"{name} must be a finite number >= 0, got {v!r}")


def evaluate(
    x: Tensor, sigmas: Tensor, s: list[float], i: int, callback: Callback | None
) -> Generator[Eval, Tensor, Tensor]:
    """``denoised = yield from evaluate(...)``: one model evaluation at sigmas[i], reported."""
    denoised = yield Eval(x, sigmas[i], i)
    report(callback, x, i, sigmas, s[i], denoised)
    return denoised


def evaluate_guided(
    x: Tensor, sigmas: Tensor, s: list[float], i: int, callback: Callback | None
) -> Generator[Eval, Tensor | Guided, tuple[Tensor, Tensor]]:
    """As :func:`evaluate` for CFG++ steppers: (guided, uncond) predictions at sigmas[i]."""
    denoised, uncond = split_guided((yield Eval(x, sigmas[i], i)))
    report(callback, x, i, sigmas, s[i], denoised)
    return denoised, uncond


def evaluate_h(
    x: Tensor, sigmas: Tensor, s: list[float], i: int, callback: Callback | None
) -> Generator[Eval, Tensor, tuple[Tensor, float | None]]:
    """Evaluate at sigmas[i]: (denoised, h = log(sigma / sigma_next)), Lu et al. (2022); h None onto 0."""
    denoised = yield from evaluate(x, sigmas, s, i, callback)
    return denoised, None if s[i + 1] == 0 else math.log(s[i] / s[i + 1])


def ancestral_evaluate_guided(
    x: Tensor, sigmas: Tensor, s: list[float], i: int, callback: Callback | None, eta: float
) -> Generator[Eval, Tensor | Guided, tuple[Tensor, Tensor, float, float]]:
    """Evaluate at sigmas[i] and split the step to sigmas[i + 1] (k-diffusion's get_ancestral_step):
    (denoised, uncond, sigma_down, sigma_up); uncond is the unconditional prediction for CFG++
    steppers, else the same as denoised."""
    denoised, uncond = yield from evaluate_guided(x, sigmas, s, i, callback)
    sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
    return denoised, uncond, sigma_down, sigma_up


def renoise(
    x: Tensor, noise_sampler: NoiseSampler, sigmas: Tensor, s: list[float], i: int, scale: float
) -> Tensor:
    """x plus scale * fresh noise from sigmas[i] to sigmas[i + 1] (ancestral), none on the step to 0."""
    if s[i + 1] > 0:
        x = x + noise_at(noise_sampler, sigmas, s[i], s[i + 1]) * scale
    return x


def euler_predict(
    x: Tensor, d: Tensor, dt: float, sigma_next: float, sigma_next_t: Tensor, i: int
) -> Generator[Eval, Tensor, tuple[Tensor, Tensor]]:
    """Euler predictor x_2 = x + d * dt and the slope there, d_2 = (x_2 - D(x_2; sigma_next)) / sigma_next."""
    x_2 = x + d * dt
    denoised_2 = yield Eval(x_2, sigma_next_t, i)
    return x_2, (x_2 - denoised_2) / sigma_next


def churned_evaluate(
    x: Tensor,
    sigmas: Tensor,
    s: list[float],
    i: int,
    callback: Callback | None,
    noise_sampler: NoiseSampler | None,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
) -> Generator[Eval, Tensor, tuple[Tensor, float, Tensor]]:
    """Churn (Karras et al. 2022), evaluate at sigma_hat: (x, sigma_hat, d = (x - denoised) / sigma_hat)."""
    x, sigma_hat = churn(x, sigmas, s, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
    denoised = yield Eval(x, sigmas.new_tensor(sigma_hat), i)
    report(callback, x, i, sigmas, sigma_hat, denoised)
    return x, sigma_hat, (x - denoised) / sigma_hat


def ancestral_noise(
    x: Tensor, noise_sampler: NoiseSampler | None, eta: float, s_noise: float
) -> NoiseSampler:
    """Check eta and s_noise, and the noise sampler of an ancestral stepper (see :func:`gaussian`)."""
    check_nonneg(eta=eta, s_noise=s_noise)
    return gaussian(x, noise_sampler)


def gaussian(x: Tensor, noise_sampler: NoiseSampler | None) -> NoiseSampler:
    """The given noise sampler, else k-diffusion's default (global-RNG normals)."""
    return default_noise_sampler(x) if noise_sampler is None else noise_sampler


def split_guided(out: Tensor | Guided) -> tuple[Tensor, Tensor]:
    """(guided, uncond) from what a driver sent; a plain tensor serves as both."""
    return (out.denoised, out.uncond) if isinstance(out, Guided) else (out, out)


def named(stepper: Callable[..., Stepper], step: Callable[..., StepResult]) -> Callable[..., Stepper]:
    """A family's stepper under its step's name and docstring (the signature stays the family's)."""
    stepper.__name__ = stepper.__qualname__ = step.__name__
    stepper.__doc__, stepper.__module__ = step.__doc__, step.__module__
    return stepper


AncestralStep = Callable[[Tensor, Tensor, Tensor, float, list[float], Tensor, int], StepResult]


def ancestral(*, guided: bool = False) -> Callable[[AncestralStep], Callable[..., Stepper]]:
    """An ancestral sampler from its deterministic step ``step(x, denoised, uncond, sigma_down, s,
    sigmas, i) -> x`` to sigma_down: evaluate, step, then fresh noise of size sigma_up (k-diffusion's
    get_ancestral_step). ``guided``: a CFG++ sampler (uncond is the unconditional prediction, else
    the same as denoised), which draws no noise where sigma_up is 0."""

    def make(step: AncestralStep) -> Callable[..., Stepper]:
        def stepper(
            x: Tensor, sigmas: Tensor, io: StepIO, *, eta: float = 1.0, s_noise: float = 1.0
        ) -> Stepper:
            noise_sampler = ancestral_noise(x, io.noise_sampler, eta, s_noise)
            s = sigmas.tolist()
            for i in range(len(s) - 1):
                denoised, uncond, sigma_down, sigma_up = yield from ancestral_evaluate_guided(
                    x, sigmas, s, i, io.callback, eta
                )
                out = step(x, denoised, uncond, sigma_down, s, sigmas, i)
                x = out if isinstance(out, Tensor) else (yield from out)  # a step that evaluates again
                if sigma_up > 0 or not guided:  # k-diffusion draws noise even at eta = 0
                    x = renoise(x, noise_sampler, sigmas, s, i, s_noise * sigma_up)
            return x

        return family(named(stepper, step), noise="gaussian", stochastic=True, needs_uncond=guided)

    return make

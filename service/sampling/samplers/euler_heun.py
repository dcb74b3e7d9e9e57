"""Karras et al. (2022) steps in sigma, with optional churn: Euler, Heun, DPM-Solver-2; Heun++ and Restart.

All integrate the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma directly in sigma.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from ..catalog import INF, Bounds, family, sampler
from ..errors import InputError
from ..schedules import get_sigmas_karras
from ..stepper import Eval, StepIO, Stepper
from .common import (
    StepResult,
    check_nonneg,
    churned_evaluate,
    euler_predict,
    gaussian,
    named,
    noise_at,
    report,
)

ChurnStep = Callable[[Tensor, Tensor, float, list[float], Tensor, int], StepResult]


def churned(step: ChurnStep) -> Callable[..., Stepper]:
    """A Karras et al. (2022) sampler from its step ``step(x, d, sigma_hat, s, sigmas, i) -> x``: churn
    (raise sigma_i to sigma_hat by adding noise), evaluate there, then step from sigma_hat to s[i + 1]."""

    def stepper(
        x: Tensor,
        sigmas: Tensor,
        io: StepIO,
        *,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = INF,
        s_noise: float = 1.0,
    ) -> Stepper:
        check_nonneg(s_churn=s_churn, s_noise=s_noise)
        s = sigmas.tolist()
        for i in range(len(s) - 1):
            x, sigma_hat, d = yield from churned_evaluate(
                x, sigmas, s, i, io.callback, io.noise_sampler, s_churn, s_tmin, s_tmax, s_noise
            )
            out = step(x, d, sigma_hat, s, sigmas, i)
            x = out if isinstance(out, Tensor) else (yield from out)  # a step that evaluates again
        return x

    return family(named(stepper, step), noise="gaussian")


@sampler(order=1, aliases=("Euler", "EulerDiscreteScheduler"), origin="k-diffusion")
@churned
def euler(x: Tensor, d: Tensor, sigma_hat: float, s: list[float], sigmas: Tensor, i: int) -> StepResult:
    """Euler method, Algorithm 2 of Karras et al. (2022), https://arxiv.org/abs/2206.00364."""
    return x + d * (s[i + 1] - sigma_hat)


@sampler(order=2, nfe_per_step=2, aliases=("Heun", "HeunDiscreteScheduler"), origin="k-diffusion")
@churned
def heun(x: Tensor, d: Tensor, sigma_hat: float, s: list[float], sigmas: Tensor, i: int) -> StepResult:
    """Heun's method, Algorithm 2 of Karras et al. (2022); Euler on the last step to sigma = 0."""
    dt = s[i + 1] - sigma_hat
    if s[i + 1] == 0:
        return x + d * dt
    _, d_2 = yield from euler_predict(x, d, dt, s[i + 1], sigmas[i + 1], i)
    return x + (d + d_2) * (dt / 2)


@sampler(order=2, nfe_per_step=2, aliases=("DPM2", "kdpm_2", "KDPM2DiscreteScheduler"), origin="k-diffusion")
@churned
def dpm_2(x: Tensor, d: Tensor, sigma_hat: float, s: list[float], sigmas: Tensor, i: int) -> StepResult:
    """DPM-Solver-2 as in Karras et al. (2022): a midpoint step in log sigma."""
    if s[i + 1] == 0:
        return x + d * (s[i + 1] - sigma_hat)
    sigma_mid = math.sqrt(sigma_hat * s[i + 1])  # midpoint in log sigma
    _, d_2 = yield from euler_predict(x, d, sigma_mid - sigma_hat, sigma_mid, sigmas.new_tensor(sigma_mid), i)
    return x + d_2 * (s[i + 1] - sigma_hat)


def _heunpp2_nfe(steps: int, opts: Mapping[str, Any]) -> int:
    return 3 * steps - 3 if steps > 1 else 1


@sampler(
    order=1,
    nfe_per_step=3,
    nfe=_heunpp2_nfe,
    aliases=("Heun++ 2", "heunpp"),
    origin="Heun++ (Carzit / ComfyUI)",
)
@churned
def heunpp2(x: Tensor, d: Tensor, sigma_hat: float, s: list[float], sigmas: Tensor, i: int) -> StepResult:
    """Heun++ (Carzit, sd-webui-samplers-scheduler, via ComfyUI): 3 stages, sigma-weighted slopes."""
    dt = s[i + 1] - sigma_hat
    if s[i + 1] == s[-1]:
        return x + d * dt
    x_2, d_2 = yield from euler_predict(x, d, dt, s[i + 1], sigmas[i + 1], i)
    if s[i + 2] == s[-1]:
        w_2 = s[i + 1] / (2 * s[0])
        return x + (d * (1 - w_2) + d_2 * w_2) * dt
    _, d_3 = yield from euler_predict(x_2, d_2, s[i + 2] - s[i + 1], s[i + 2], sigmas[i + 2], i)
    w_2, w_3 = s[i + 1] / (3 * s[0]), s[i + 2] / (3 * s[0])
    return x + (d * (1 - w_2 - w_3) + d_2 * w_2 + d_3 * w_3) * dt


def _restart_nfe(steps: int, opts: Mapping[str, Any]) -> int:
    times = opts.get("restart_times")
    times = (2 if steps >= 19 else 0) if times is None else int(times)
    if steps < 2:
        return 1
    return 2 * steps - 1 + times * (int(opts.get("restart_steps", 10)) - 1) * 2


def restart_plan(
    s: list[float],
    restart_times: int | None,
    restart_steps: int,
    restart_sigma_lo: float,
    restart_sigma_hi: float,
) -> list[tuple[int, float, float]]:
    """(outer step, sigma_from, sigma_to) of every Heun step, restart segments included."""
    n = len(s) - 1
    times = (2 if n >= 19 else 0) if restart_times is None else restart_times
    plan = [(i, s[i], s[i + 1]) for i in range(n)]
    if times <= 0 or n < 2:
        return plan
    positive = s[:n] if s[-1] == 0 else s
    lo = min(range(len(positive)), key=lambda k: abs(positive[k] - restart_sigma_lo))
    hi = min(range(len(positive)), key=lambda k: abs(positive[k] - restart_sigma_hi))
    if hi >= lo:
        return plan
    sub = get_sigmas_karras(restart_steps, s[lo], s[hi]).double()[:-1].tolist()
    segment = [(lo - 1, a, b) for a, b in zip(sub[:-1], sub[1:], strict=True)] * times
    return plan[:lo] + segment + plan[lo:]


@sampler(
    order=2,
    nfe_per_step=2,
    nfe=_restart_nfe,
    noise="gaussian",
    stochastic=True,
    options={
        "restart_times": Bounds(lo=0, hi=20, integer=True),
        "restart_steps": Bounds(lo=2, hi=100, integer=True),
        "restart_sigma_lo": Bounds(lo=0.0, hi=INF),
        "restart_sigma_hi": Bounds(lo=0.0, hi=INF),
    },
    aliases=("Restart",),
    origin="Restart (Xu et al. 2023)",
)
def restart(
    x: Tensor,
    sigmas: Tensor,
    io: StepIO,
    *,
    s_noise: float = 1.0,
    restart_times: int | None = None,
    restart_steps: int = 10,
    restart_sigma_lo: float = 0.1,
    restart_sigma_hi: float = 2.0,
) -> Stepper:
    """Restart sampling, Xu et al. (2023), https://arxiv.org/abs/2306.14878: Heun steps plus noisy restarts.

    After reaching the schedule's sigma nearest ``restart_sigma_lo``, jump back up to the sigma
    nearest ``restart_sigma_hi`` by adding fresh noise and descend again on a Karras sub-schedule
    of ``restart_steps`` points, ``restart_times`` times (default: 2 from 19 steps on, else 0; A1111's).
    """
    check_nonneg(s_noise=s_noise)
    if restart_times is not None and (isinstance(restart_times, bool) or int(restart_times) != restart_times):
        raise InputError("restart_times", f"restart_times must be an integer >= 0, got {restart_times!r}")
    if isinstance(restart_steps, bool) or int(restart_steps) != restart_steps or restart_steps < 2:
        raise InputError("restart_steps", f"restart_steps must be an integer >= 2, got {restart_steps!r}")
    noise_sampler = gaussian(x, io.noise_sampler)
    s = sigmas.tolist()
    plan = restart_plan(s, restart_times, int(restart_steps), restart_sigma_lo, restart_sigma_hi)
    last: float | None = None
    for i, sigma, sigma_next in plan:
        if last is not None and last < sigma:  # a restart: noise back up to sigma
            eps = noise_at(noise_sampler, sigmas, last, sigma)
            x = x + eps * (s_noise * math.sqrt(sigma**2 - last**2))
        denoised = yield Eval(x, sigmas.new_tensor(sigma), i)
        report(io.callback, x, i, sigmas, sigma, denoised)
        d = (x - denoised) / sigma
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            _, d_2 = yield from euler_predict(x, d, dt, sigma_next, sigmas.new_tensor(sigma_next), i)
            x = x + (d + d_2) * (dt / 2)
        last = sigma_next
    return x

"""DPM-Solver++ (Lu et al. 2022, https://arxiv.org/abs/2211.01095): exponential integrators in
lambda = -log(sigma) on the data prediction; single-step (2S, SDE) and multistep (2M, 3M) forms."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor

from ..catalog import Bounds, sampler
from ..errors import InputError
from ..stepper import Eval, StepIO, Stepper
from .common import StepResult, ancestral, ancestral_step, brownian, check_nonneg, evaluate_h, noise_at


@sampler(order=2, nfe_per_step=2, aliases=("DPM++ 2S a", "dpmpp_2s"), origin="k-diffusion")
@ancestral()
def dpmpp_2s_ancestral(
    x: Tensor, denoised: Tensor, uncond: Tensor, sigma_down: float, s: list[float], sigmas: Tensor, i: int
) -> StepResult:
    """Ancestral sampling with DPM-Solver++(2S) steps, Lu et al. (2022), https://arxiv.org/abs/2211.01095."""
    if sigma_down == 0:
        return x + (x - denoised) * ((sigma_down - s[i]) / s[i])
    h = math.log(s[i] / sigma_down)  # t = -log(sigma)
    sigma_s = s[i] * math.exp(-h / 2)
    x_2 = x * (sigma_s / s[i]) - denoised * math.expm1(-h / 2)
    denoised_2 = yield Eval(x_2, sigmas.new_tensor(sigma_s), i)
    return x * (sigma_down / s[i]) - denoised_2 * math.expm1(-h)


@sampler(
    order=2,
    nfe_per_step=2,
    noise="brownian",
    stochastic=True,
    options={"r": Bounds(lo=0.01, hi=1.0)},
    aliases=("DPM++ SDE", "DPMSolverSDEScheduler"),
    origin="k-diffusion",
)
def dpmpp_sde(
    x: Tensor, sigmas: Tensor, io: StepIO, *, eta: float = 1.0, s_noise: float = 1.0, r: float = 1 / 2
) -> Stepper:
    """DPM-Solver++ (stochastic, two stages per step with Brownian noise), Lu et al. (2022)."""
    check_nonneg(eta=eta, s_noise=s_noise)
    if not 0 < r <= 1:
        raise InputError("r", f"r must be in (0, 1], got {r!r}")
    noise_sampler = brownian(x, sigmas, io.noise_sampler)
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised, h = yield from evaluate_h(x, sigmas, s, i, io.callback)
        if h is None:
            x = x + (x - denoised) * ((s[i + 1] - s[i]) / s[i])
            continue
        sigma_s = s[i] * math.exp(-h * r)
        fac = 1 / (2 * r)
        # Stage 1: to the intermediate sigma_s, ancestrally.
        sd, su = ancestral_step(s[i], sigma_s, eta)
        x_2 = x * (sd / s[i]) - denoised * (sd / s[i] - 1)  # DPM-Solver++(1) to sd: expm1(log(sd / sigma))
        x_2 = x_2 + noise_at(noise_sampler, sigmas, s[i], sigma_s) * (s_noise * su)
        denoised_2 = yield Eval(x_2, sigmas.new_tensor(sigma_s), i)
        # Stage 2: the full step with the combined prediction.
        sd, su = ancestral_step(s[i], s[i + 1], eta)
        denoised_d = denoised * (1 - fac) + denoised_2 * fac
        x = x * (sd / s[i]) - denoised_d * (sd / s[i] - 1)
        x = x + noise_at(noise_sampler, sigmas, s[i], s[i + 1]) * (s_noise * su)
    return x


@sampler(order=2, aliases=("DPM++ 2M", "DPMSolverMultistepScheduler", "dpmpp_2m"), origin="k-diffusion")
def dpmpp_2m(x: Tensor, sigmas: Tensor, io: StepIO) -> Stepper:
    """DPM-Solver++(2M), Lu et al. (2022), https://arxiv.org/abs/2211.01095."""
    s = sigmas.tolist()
    old_denoised = None
    for i in range(len(s) - 1):
        denoised, h = yield from evaluate_h(x, sigmas, s, i, io.callback)
        if h is None:
            x = denoised  # sigma_next / sigma = 0 and -expm1(-h) = 1
        else:
            if old_denoised is None:
                denoised_d = denoised
            else:
                r = math.log(s[i - 1] / s[i]) / h  # h_last / h
                denoised_d = denoised * (1 + 1 / (2 * r)) - old_denoised * (1 / (2 * r))
            x = x * (s[i + 1] / s[i]) - denoised_d * math.expm1(-h)
        old_denoised = denoised
    return x


@sampler(
    name="dpmpp_2m_sde_heun",
    fixed={"solver_type": "heun"},
    doc="DPM-Solver++(2M) SDE with the Heun-type correction, Lu et al. (2022) (A1111/ComfyUI's name).",
    aliases=("DPM++ 2M SDE Heun",),
    origin="DPM-Solver++ (Lu et al. 2022)",
)
@sampler(
    order=2,
    noise="brownian",
    stochastic=True,
    options={"solver_type": Bounds(choices=("midpoint", "heun"))},
    aliases=("DPM++ 2M SDE",),
    origin="k-diffusion",
)
def dpmpp_2m_sde(
    x: Tensor,
    sigmas: Tensor,
    io: StepIO,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
) -> Stepper:
    """DPM-Solver++(2M) SDE, Lu et al. (2022); solver_type 'midpoint' or 'heun'."""
    if solver_type not in {"heun", "midpoint"}:
        raise ValueError(f"solver_type must be 'heun' or 'midpoint', got {solver_type!r}")

    def step(x: Tensor, denoised: Tensor, h: float, hist: SdeHistory, ratio: float) -> Tensor:
        eta_h = eta * h
        phi_1 = -math.expm1(-h - eta_h)
        x = x * (ratio * math.exp(-eta_h)) + denoised * phi_1
        if hist:
            old_denoised, h_last = hist[0]
            coeff = (1 - phi_1 / (h + eta_h)) if solver_type == "heun" else 0.5 * phi_1
            x = x + (denoised - old_denoised) * (coeff / (h_last / h))
        return x

    return (yield from sde_multistep(x, sigmas, io, eta, s_noise, step))


SdeHistory = list[tuple[Tensor, float]]  # (denoised, h) of the last steps, newest first


def sde_multistep(
    x: Tensor, sigmas: Tensor, io: StepIO, eta: float, s_noise: float, step: Callable[..., Tensor]
) -> Stepper:
    """The DPM-Solver++ multistep SDE loop (Lu et al. 2022): evaluate, take the multistep ``step(x,
    denoised, h, history, sigma_next / sigma)`` in lambda, add Brownian noise of variance
    sigma_next^2 (1 - e^(-2 eta h)); the last step to sigma = 0 returns the denoised prediction."""
    check_nonneg(eta=eta, s_noise=s_noise)
    noise_sampler = brownian(x, sigmas, io.noise_sampler)
    s = sigmas.tolist()
    hist: SdeHistory = []
    for i in range(len(s) - 1):
        denoised, h = yield from evaluate_h(x, sigmas, s, i, io.callback)
        if h is None:
            x = denoised  # the final denoising step
            continue
        x = step(x, denoised, h, hist, s[i + 1] / s[i])
        if eta:
            noise = noise_at(noise_sampler, sigmas, s[i], s[i + 1])
            x = x + noise * (s[i + 1] * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise)
        hist = [(denoised, h), *hist[:1]]
    return x


@sampler(
    order=3,
    noise="brownian",
    stochastic=True,
    aliases=("DPM++ 3M SDE", "dpmpp_3m"),
    origin="k-diffusion",
)
def dpmpp_3m_sde(x: Tensor, sigmas: Tensor, io: StepIO, *, eta: float = 1.0, s_noise: float = 1.0) -> Stepper:
    """DPM-Solver++(3M) SDE, Lu et al. (2022), third-order multistep with Brownian noise."""

    def step(x: Tensor, denoised: Tensor, h: float, hist: SdeHistory, ratio: float) -> Tensor:
        h_eta = h * (eta + 1)
        x = x * math.exp(-h_eta) - denoised * math.expm1(-h_eta)
        phi_2 = math.expm1(-h_eta) / h_eta + 1
        if len(hist) == 2:
            (denoised_1, h_1), (denoised_2, h_2) = hist
            r0, r1 = h_1 / h, h_2 / h
            d1_0 = (denoised - denoised_1) / r0
            d1_1 = (denoised_1 - denoised_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_3 = phi_2 / h_eta - 0.5
            x = x + d1 * phi_2 - d2 * phi_3
        elif hist:
            denoised_1, h_1 = hist[0]
            x = x + (denoised - denoised_1) * (phi_2 / (h_1 / h))
        return x

    return (yield from sde_multistep(x, sigmas, io, eta, s_noise, step))

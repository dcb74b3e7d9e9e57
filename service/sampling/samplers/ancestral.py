"""Ancestral and consistency samplers: a step to the x0 prediction's line, then fresh noise.

Euler and DPM-Solver-2 ancestral (k-diffusion), DDIM and DDPM (which are ancestral Euler in
k-diffusion's sigma form: eps = d = (x - denoised) / sigma, x_vp = x / sqrt(1 + sigma^2)), and the
consistency-model samplers LCM and TCD.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..catalog import Bounds, sampler
from ..errors import InputError
from ..stepper import StepIO, Stepper
from .common import StepResult, ancestral, check_nonneg, euler_predict, evaluate, gaussian, noise_at, renoise


@sampler(
    name="ddpm",
    fixed={"eta": 1.0},
    doc="DDPM ancestral sampling, Ho et al. (2020), https://arxiv.org/abs/2006.11239 (DDIM at eta 1).",
    aliases=("DDPM", "DDPMScheduler"),
    origin="DDPM (Ho et al. 2020)",
)
@sampler(
    order=1,
    aliases=("Euler a", "euler_a", "k_euler_a", "EulerAncestralDiscreteScheduler"),
    origin="k-diffusion",
)
@ancestral()
def euler_ancestral(
    x: Tensor, denoised: Tensor, uncond: Tensor, sigma_down: float, s: list[float], sigmas: Tensor, i: int
) -> StepResult:
    """Ancestral sampling with Euler steps (Song et al. 2021 / Crowson)."""
    d = (x - denoised) / s[i]
    return x + d * (sigma_down - s[i])


@sampler(
    order=2,
    nfe_per_step=2,
    aliases=("DPM2 a", "kdpm_2_a", "KDPM2AncestralDiscreteScheduler"),
    origin="k-diffusion",
)
@ancestral()
def dpm_2_ancestral(
    x: Tensor, denoised: Tensor, uncond: Tensor, sigma_down: float, s: list[float], sigmas: Tensor, i: int
) -> StepResult:
    """Ancestral sampling with DPM-Solver-2 steps."""
    d = (x - denoised) / s[i]
    if sigma_down == 0:
        return x + d * (sigma_down - s[i])
    sigma_mid = math.sqrt(s[i] * sigma_down)  # midpoint in log sigma
    _, d_2 = yield from euler_predict(x, d, sigma_mid - s[i], sigma_mid, sigmas.new_tensor(sigma_mid), i)
    return x + d_2 * (sigma_down - s[i])


@sampler(
    order=1,
    noise="gaussian",
    options={"eta": Bounds(lo=0.0, hi=1.0)},  # eta runs from DDIM (0) to DDPM (1)
    aliases=("DDIM", "DDIMScheduler"),
    origin="DDIM (Song et al. 2021)",
)
def ddim(x: Tensor, sigmas: Tensor, io: StepIO, *, eta: float = 0.0, s_noise: float = 1.0) -> Stepper:
    """DDIM, Song et al. (2021), https://arxiv.org/abs/2010.02502 (in sigma form: ancestral Euler, eta)."""
    # DDIM's sigma_t(eta) divided by sqrt(alpha_bar_prev) is exactly get_ancestral_step's sigma_up.
    return (yield from euler_ancestral(x, sigmas, io, eta=eta, s_noise=s_noise))


@sampler(
    order=1,
    noise="gaussian",
    stochastic=True,
    aliases=("LCM", "LCMScheduler"),
    origin="LCM (Luo et al. 2023)",
)
def lcm(x: Tensor, sigmas: Tensor, io: StepIO, *, s_noise: float = 1.0) -> Stepper:
    """Latent Consistency Model multistep sampling, Luo et al. (2023), https://arxiv.org/abs/2310.04378."""
    check_nonneg(s_noise=s_noise)
    noise_sampler = gaussian(x, io.noise_sampler)
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = yield from evaluate(x, sigmas, s, i, io.callback)
        x = denoised
        # re-noise the consistency prediction to the next level
        x = renoise(x, noise_sampler, sigmas, s, i, s_noise * s[i + 1])
    return x


def sd_sigma_table() -> Tensor:
    """Stable Diffusion's discrete sigmas (scaled-linear 0.00085..0.012, T=1000), ascending."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def _timestep(sigma: float, log_table: Tensor) -> float:
    """Continuous timestep of sigma on an ascending table (log-linear), snapped to integers within 1e-4."""
    if sigma <= 0:
        return 0.0
    ls = math.log(sigma)
    idx = int(
        torch.searchsorted(log_table, torch.tensor(ls, dtype=log_table.dtype)).clamp(1, len(log_table) - 1)
    )
    lo, hi = float(log_table[idx - 1]), float(log_table[idx])
    t = min(max(idx - 1 + (ls - lo) / (hi - lo), 0.0), len(log_table) - 1.0)
    return float(round(t)) if abs(t - round(t)) < 1e-4 else t


def _tcd_sigma_s(sigma_next: float, gamma: float, log_table: Tensor) -> float:
    """sigma at timestep (1 - gamma) * t(sigma_next): floored like diffusers on the table, else log-linear."""
    if gamma == 0 and sigma_next > 0:
        return sigma_next
    t = _timestep(sigma_next, log_table)
    t_s = (1 - gamma) * t
    if t == int(t):
        return float(log_table[int(math.floor(t_s))].exp())
    lo = int(math.floor(t_s))
    hi = min(lo + 1, len(log_table) - 1)
    w = t_s - lo
    return min(math.exp((1 - w) * float(log_table[lo]) + w * float(log_table[hi])), sigma_next)


@sampler(
    order=1,
    noise="gaussian",
    stochastic=True,
    options={"gamma": Bounds(lo=0.0, hi=1.0)},
    internal=("sigma_table",),
    aliases=("TCD", "TCDScheduler"),
    origin="TCD (Zheng et al. 2024)",
)
def tcd(
    x: Tensor,
    sigmas: Tensor,
    io: StepIO,
    *,
    gamma: float = 0.3,
    s_noise: float = 1.0,
    sigma_table: Tensor | None = None,
) -> Stepper:
    """Trajectory Consistency Distillation sampling, Zheng et al. (2024), https://arxiv.org/abs/2402.19159.

    Each step predicts x0, moves deterministically to the intermediate timestep
    s = floor((1 - gamma) * t_next) of the model's discrete table (``sigma_table``, ascending;
    Stable Diffusion's by default) and re-noises from there to the next sigma. gamma = 0 is DDIM;
    the last step stops at s (the table's sigma at timestep floor((1 - gamma) * 0) = 0), as diffusers does.
    """
    check_nonneg(gamma=gamma, s_noise=s_noise)
    if gamma > 1:
        raise InputError("gamma", f"gamma must be in [0, 1], got {gamma!r}")
    noise_sampler = gaussian(x, io.noise_sampler)
    table = (sd_sigma_table() if sigma_table is None else torch.as_tensor(sigma_table)).double().cpu()
    log_table = table.log()
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = yield from evaluate(x, sigmas, s, i, io.callback)
        sigma_s = _tcd_sigma_s(s[i + 1], gamma, log_table)
        x = denoised + (x - denoised) * (sigma_s / s[i])  # DDIM step to sigma_s
        if gamma > 0 and i < len(s) - 2 and s[i + 1] > sigma_s:  # forward diffusion back up to sigma_next
            x = x + noise_at(noise_sampler, sigmas, sigma_s, s[i + 1]) * (
                s_noise * math.sqrt(s[i + 1] ** 2 - sigma_s**2)
            )
    return x

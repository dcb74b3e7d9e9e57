"""Samplers beyond k-diffusion's that users know from A1111, ComfyUI and diffusers (see docs/SAMPLERS.md).

Same stepper convention as :mod:`.samplers`: ``name(x, sigmas, *, callback=None, noise_sampler=None,
**options)`` yields :class:`Eval` and returns x, in k-diffusion's variance-exploding form
x = x0 + sigma * n. DDPM-era samplers written for x_vp = x / sqrt(1 + sigma^2) and epsilon map
onto it with eps = d = (x - denoised) / sigma; where that makes two algorithms one (DDIM and
ancestral Euler), the sampler delegates instead of copying the math.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import samplers
from .noise import NoiseSampler, default_noise_sampler
from .samplers import INF, _check_nonneg, _churn, _noise, _report
from .schedules import get_sigmas_karras
from .stepper import Callback, Eval, Stepper

# Adams-Bashforth coefficients for equal steps, newest derivative first (orders 1-4).
AB_COEFFS: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def ddim(
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 0.0,
    s_noise: float = 1.0,
) -> Stepper:
    """DDIM, Song et al. (2021), https://arxiv.org/abs/2010.02502 (in sigma form: ancestral Euler, eta)."""
    # DDIM's sigma_t(eta) divided by sqrt(alpha_bar_prev) is exactly get_ancestral_step's sigma_up.
    return (
        yield from samplers.euler_ancestral(
            x, sigmas, callback=callback, noise_sampler=noise_sampler, eta=eta, s_noise=s_noise
        )
    )


def ddpm(
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    s_noise: float = 1.0,
) -> Stepper:
    """DDPM ancestral sampling, Ho et al. (2020), https://arxiv.org/abs/2006.11239 (DDIM at eta 1)."""
    return (
        yield from samplers.euler_ancestral(
            x, sigmas, callback=callback, noise_sampler=noise_sampler, eta=1.0, s_noise=s_noise
        )
    )


def lcm(
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    s_noise: float = 1.0,
) -> Stepper:
    """Latent Consistency Model multistep sampling, Luo et al. (2023), https://arxiv.org/abs/2310.04378."""
    _check_nonneg(s_noise=s_noise)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = yield Eval(x, sigmas[i], i)
        _report(callback, x, i, sigmas, s[i], denoised)
        x = denoised
        if s[i + 1] > 0:  # re-noise the consistency prediction to the next level
            x = x + _noise(noise_sampler, sigmas, s[i], s[i + 1]) * (s_noise * s[i + 1])
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


def tcd(
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
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
    _check_nonneg(gamma=gamma, s_noise=s_noise)
    if gamma > 1:
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    table = (sd_sigma_table() if sigma_table is None else torch.as_tensor(sigma_table)).double().cpu()
    log_table = table.log()
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = yield Eval(x, sigmas[i], i)
        _report(callback, x, i, sigmas, s[i], denoised)
        sigma_s = _tcd_sigma_s(s[i + 1], gamma, log_table)
        x = denoised + (x - denoised) * (sigma_s / s[i])  # DDIM step to sigma_s
        if gamma > 0 and i < len(s) - 2 and s[i + 1] > sigma_s:  # forward diffusion back up to sigma_next
            x = x + _noise(noise_sampler, sigmas, sigma_s, s[i + 1]) * (
                s_noise * math.sqrt(s[i + 1] ** 2 - sigma_s**2)
            )
    return x


def plms(
    x: Tensor, sigmas: Tensor, *, callback: Callback | None = None, noise_sampler: NoiseSampler | None = None
) -> Stepper:
    """Pseudo linear multistep (PLMS/PNDM), Liu et al. (2022), https://arxiv.org/abs/2202.09778.

    A Heun (pseudo improved Euler) first step, then Adams-Bashforth 2-4 with equal-step
    coefficients on eps = d; one extra model call in all (as in LDM, A1111 and diffusers).
    """
    s = sigmas.tolist()
    ds: list[Tensor] = []
    for i in range(len(s) - 1):
        denoised = yield Eval(x, sigmas[i], i)
        _report(callback, x, i, sigmas, s[i], denoised)
        d = (x - denoised) / s[i]
        dt = s[i + 1] - s[i]
        if not ds and s[i + 1] > 0:
            x_2 = x + d * dt
            denoised_2 = yield Eval(x_2, sigmas[i + 1], i)
            x = x + (d + (x_2 - denoised_2) / s[i + 1]) * (dt / 2)
            ds.append(d)
            continue
        ds = [*ds[-3:], d]
        x = x + sum(c * dj for c, dj in zip(AB_COEFFS[len(ds)], reversed(ds), strict=True)) * dt
    return x


def ipndm(
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    max_order: int = 4,
) -> Stepper:
    """Improved PNDM (Zhang & Chen 2022, https://arxiv.org/abs/2204.13902): AB 1-4 on d, lower-order start."""
    if isinstance(max_order, bool) or max_order not in AB_COEFFS:
        raise ValueError(f"max_order must be an integer in [1, 4], got {max_order!r}")
    s = sigmas.tolist()
    ds: list[Tensor] = []
    for i in range(len(s) - 1):
        denoised = yield Eval(x, sigmas[i], i)
        _report(callback, x, i, sigmas, s[i], denoised)
        ds = [*ds[-(max_order - 1) :], (x - denoised) / s[i]] if max_order > 1 else [(x - denoised) / s[i]]
        coeffs = AB_COEFFS[len(ds)]
        x = x + sum(c * dj for c, dj in zip(coeffs, reversed(ds), strict=True)) * (s[i + 1] - s[i])
    return x


def ipndm_v(
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    max_order: int = 4,
) -> Stepper:
    """iPNDM with variable step sizes (Zhang & Chen 2022): exact variable-step Adams-Bashforth in sigma."""
    if isinstance(max_order, bool) or max_order not in AB_COEFFS:
        raise ValueError(f"max_order must be an integer in [1, 4], got {max_order!r}")
    # The variable-step AB coefficients are the integrals of the Lagrange basis: k-diffusion's LMS.
    return (
        yield from samplers.lms(x, sigmas, callback=callback, noise_sampler=noise_sampler, order=max_order)
    )


def heunpp2(
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = INF,
    s_noise: float = 1.0,
) -> Stepper:
    """Heun++ (Carzit, sd-webui-samplers-scheduler, via ComfyUI): 3 stages, sigma-weighted slopes."""
    _check_nonneg(s_churn=s_churn, s_noise=s_noise)
    s = sigmas.tolist()
    s_end = s[-1]
    for i in range(len(s) - 1):
        x, sigma_hat = _churn(x, sigmas, s, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = yield Eval(x, sigmas.new_tensor(sigma_hat), i)
        _report(callback, x, i, sigmas, sigma_hat, denoised)
        d = (x - denoised) / sigma_hat
        dt = s[i + 1] - sigma_hat
        if s[i + 1] == s_end:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        denoised_2 = yield Eval(x_2, sigmas[i + 1], i)
        d_2 = (x_2 - denoised_2) / s[i + 1]
        if s[i + 2] == s_end:
            w_2 = s[i + 1] / (2 * s[0])
            x = x + (d * (1 - w_2) + d_2 * w_2) * dt
            continue
        x_3 = x_2 + d_2 * (s[i + 2] - s[i + 1])
        denoised_3 = yield Eval(x_3, sigmas[i + 2], i)
        d_3 = (x_3 - denoised_3) / s[i + 2]
        w_2, w_3 = s[i + 1] / (3 * s[0]), s[i + 2] / (3 * s[0])
        x = x + (d * (1 - w_2 - w_3) + d_2 * w_2 + d_3 * w_3) * dt
    return x


def gradient_estimation(
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    ge_gamma: float = 2.0,
) -> Stepper:
    """Gradient estimation, Permenter & Yuan (2023), https://arxiv.org/abs/2306.04848."""
    if not math.isfinite(ge_gamma):
        raise ValueError(f"ge_gamma must be finite, got {ge_gamma!r}")
    s = sigmas.tolist()
    old_d: Tensor | None = None
    for i in range(len(s) - 1):
        denoised = yield Eval(x, sigmas[i], i)
        _report(callback, x, i, sigmas, s[i], denoised)
        d = (x - denoised) / s[i]
        d_bar = d if old_d is None else d * ge_gamma + old_d * (1 - ge_gamma)
        x = x + d_bar * (s[i + 1] - s[i])
        old_d = d
    return x


def dpmpp_2m_sde_heun(
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Stepper:
    """DPM-Solver++(2M) SDE with the Heun-type correction, Lu et al. (2022) (A1111/ComfyUI's name)."""
    return (
        yield from samplers.dpmpp_2m_sde(
            x,
            sigmas,
            callback=callback,
            noise_sampler=noise_sampler,
            eta=eta,
            s_noise=s_noise,
            solver_type="heun",
        )
    )


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


def restart(
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
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
    _check_nonneg(s_noise=s_noise)
    if restart_times is not None and (isinstance(restart_times, bool) or int(restart_times) != restart_times):
        raise ValueError(f"restart_times must be an integer >= 0, got {restart_times!r}")
    if isinstance(restart_steps, bool) or int(restart_steps) != restart_steps or restart_steps < 2:
        raise ValueError(f"restart_steps must be an integer >= 2, got {restart_steps!r}")
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s = sigmas.tolist()
    plan = restart_plan(s, restart_times, int(restart_steps), restart_sigma_lo, restart_sigma_hi)
    last: float | None = None
    for i, sigma, sigma_next in plan:
        if last is not None and last < sigma:  # a restart: noise back up to sigma
            eps = _noise(noise_sampler, sigmas, last, sigma)
            x = x + eps * (s_noise * math.sqrt(sigma**2 - last**2))
        denoised = yield Eval(x, sigmas.new_tensor(sigma), i)
        _report(callback, x, i, sigmas, sigma, denoised)
        d = (x - denoised) / sigma
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = yield Eval(x_2, sigmas.new_tensor(sigma_next), i)
            x = x + (d + (x_2 - denoised_2) / sigma_next) * (dt / 2)
        last = sigma_next
    return x

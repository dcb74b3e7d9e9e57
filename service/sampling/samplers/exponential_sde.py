"""Stochastic exponential samplers: ER-SDE and SEEDS (see docs/SAMPLERS.md).

Written on k-diffusion's x = x0 + sigma * n with lambda = -log(sigma). Noise that several stages
share is composed exactly: an Ornstein-Uhlenbeck increment over each sub-interval, decayed to
later stages, so every stage sees the marginal variance the SDE prescribes.
"""

from __future__ import annotations

import math

import numpy as np
from torch import Tensor

from ..catalog import Bounds, sampler
from ..errors import InputError
from ..stepper import Eval, StepIO, Stepper
from .common import ancestral_noise, check_nonneg, evaluate, evaluate_h, gaussian, noise_at

_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(24)


def er_noise_scaler(sigma: float) -> float:
    """ER-SDE's default noise-scale function phi(sigma) = sigma * (exp(sigma^0.3) + 10)."""
    return sigma * (math.exp(sigma**0.3) + 10.0)


def _er_dphi(sigma: float) -> float:
    e = math.exp(sigma**0.3)
    return e + 10.0 + 0.3 * sigma**0.3 * e


def er_coeffs(sigma_t: float, sigma_s: float, sigma_p: float, sigma_q: float) -> tuple[float, float]:
    """phi_t * integral over [sigma_t, sigma_s] of phi'/phi^2 * (s - s_s) and * (s - s_s)(s - s_p).

    Gauss-Legendre in log sigma (the integrand is smooth there); sigma_q is unused, kept for clarity
    of the Newton form D(s) = D_s + (s - s_s) dd1 + (s - s_s)(s - s_p) dd2.
    """
    a, b = math.log(sigma_t), math.log(sigma_s)
    u = (b - a) / 2 * _GL_NODES + (a + b) / 2
    sig = np.exp(u)
    w = np.array([_er_dphi(v) / er_noise_scaler(v) ** 2 for v in sig]) * sig * (b - a) / 2 * _GL_WEIGHTS
    phi_t = er_noise_scaler(sigma_t)
    return phi_t * float(np.sum(w * (sig - sigma_s))), phi_t * float(
        np.sum(w * (sig - sigma_s) * (sig - sigma_p))
    )


@sampler(
    order=3,
    noise="gaussian",
    stochastic=True,
    options={"max_stage": Bounds(lo=1, hi=3, integer=True)},
    aliases=("ER SDE", "ER-SDE"),
    origin="ER-SDE (Cui et al. 2023)",
)
def er_sde(x: Tensor, sigmas: Tensor, io: StepIO, *, s_noise: float = 1.0, max_stage: int = 3) -> Stepper:
    """ER-SDE-Solver-3 (VE), Cui et al. (2023), https://arxiv.org/abs/2309.06169."""
    check_nonneg(s_noise=s_noise)
    if isinstance(max_stage, bool) or max_stage not in (1, 2, 3):
        raise ValueError(f"max_stage must be 1, 2 or 3, got {max_stage!r}")
    noise_sampler = gaussian(x, io.noise_sampler)
    s = sigmas.tolist()
    old: list[Tensor] = []  # previous denoised, newest last
    dd1_old: Tensor | None = None
    for i in range(len(s) - 1):
        denoised = yield from evaluate(x, sigmas, s, i, io.callback)
        if s[i + 1] == 0:
            x = denoised
            continue
        stage = min(max_stage, i + 1)
        r = er_noise_scaler(s[i + 1]) / er_noise_scaler(s[i])
        x_new = x * r + denoised * (1 - r)
        dd1 = None
        if stage >= 2:
            dd1 = (denoised - old[-1]) / (s[i] - s[i - 1])
            c1, c2 = er_coeffs(s[i + 1], s[i], s[i - 1], s[i - 2] if i >= 2 else 0.0)
            x_new = x_new + dd1 * c1
            if stage >= 3 and dd1_old is not None:
                x_new = x_new + (dd1 - dd1_old) * (c2 / (s[i] - s[i - 2]))
        x = x_new
        var = s[i + 1] ** 2 - (s[i] * r) ** 2
        if s_noise and var > 0:
            x = x + noise_at(noise_sampler, sigmas, s[i], s[i + 1]) * (s_noise * math.sqrt(var))
        old = [*old[-1:], denoised]
        dd1_old = dd1
    return x


def _ou(zs: list[Tensor], cuts: list[float], a: float, eta: float) -> Tensor | float:
    """Unit-scale noise at lambda offset ``a`` from increments ``zs`` over [0, cuts[0]], [cuts[0], ...]."""
    out: Tensor | float = 0.0
    prev = 0.0
    for z, b in zip(zs, cuts, strict=False):
        if b > a + 1e-15:
            break
        out = out + z * (math.exp(-eta * (a - b)) * math.sqrt(-math.expm1(-2 * eta * (b - prev))))
        prev = b
    return out


def _phi2(z: float) -> float:
    """(z - 1 + exp(-z)) / z: the weight of a linear-in-lambda D over an exponential step of size z."""
    return math.expm1(-z) / z + 1


def _stage(
    x: Tensor,
    denoised: Tensor,
    sigma: float,
    c: float,
    eta: float,
    zs: list[Tensor],
    cuts: list[float],
    a: float,
    correction: Tensor | float = 0.0,
) -> Tensor:
    out = x * math.exp(-a * c) - denoised * math.expm1(-a * c) + correction
    return out + _ou(zs, cuts, a, eta) * (sigma * math.exp(-a)) if zs else out


def _seeds(
    x: Tensor, sigmas: Tensor, io: StepIO, eta: float, s_noise: float, rs: tuple[float, ...]
) -> Stepper:
    noise_sampler = ancestral_noise(x, io.noise_sampler, eta, s_noise)
    s = sigmas.tolist()
    c = 1 + eta
    for i in range(len(s) - 1):
        denoised, h = yield from evaluate_h(x, sigmas, s, i, io.callback)
        if h is None:
            x = denoised
            continue
        cuts = [r * h for r in rs] + [h]
        zs: list[Tensor] = []
        if eta and s_noise:
            bounds = [s[i] * math.exp(-b) for b in [0.0, *cuts]]
            zs = [
                noise_at(noise_sampler, sigmas, bounds[k], bounds[k + 1]) * s_noise for k in range(len(cuts))
            ]

        # Each stage: the exact step of the linear part from sigma_s to offset a (in lambda), D held at
        # ``denoised`` plus a correction, and the composed noise.
        args = (x, denoised, s[i], c, eta, zs, cuts)
        if len(rs) == 1:  # SEEDS-2: midpoint-type combination of the two predictions
            (r,) = rs
            denoised_2 = yield Eval(_stage(*args, r * h), sigmas.new_tensor(s[i] * math.exp(-r * h)), i)
            x = _stage(*args, h, (denoised_2 - denoised) * (-math.expm1(-h * c) / (2 * r)))
        else:  # SEEDS-3: phi_2 corrections from the stage predictions
            r1, r2 = rs
            denoised_2 = yield Eval(_stage(*args, r1 * h), sigmas.new_tensor(s[i] * math.exp(-r1 * h)), i)
            x_3 = _stage(*args, r2 * h, (denoised_2 - denoised) * (r2 / r1 * _phi2(r2 * h * c)))
            denoised_3 = yield Eval(x_3, sigmas.new_tensor(s[i] * math.exp(-r2 * h)), i)
            x = _stage(*args, h, (denoised_3 - denoised) * (_phi2(h * c) / r2))
    return x


@sampler(
    order=2,
    nfe_per_step=2,
    noise="gaussian",
    stochastic=True,
    options={"r": Bounds(lo=0.01, hi=0.99)},
    aliases=("SEEDS 2",),
    origin="SEEDS (Gonzalez et al. 2023)",
)
def seeds_2(
    x: Tensor, sigmas: Tensor, io: StepIO, *, eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5
) -> Stepper:
    """SEEDS-2, Gonzalez et al. (2023), https://arxiv.org/abs/2305.14267: 2-stage exponential SDE solver."""
    if not 0 < r < 1:
        raise ValueError(f"r must be in (0, 1), got {r!r}")
    return (yield from _seeds(x, sigmas, io, eta, s_noise, (r,)))


@sampler(
    order=3,
    nfe_per_step=3,
    noise="gaussian",
    stochastic=True,
    options={"r_1": Bounds(lo=0.01, hi=0.98), "r_2": Bounds(lo=0.02, hi=0.99)},
    aliases=("SEEDS 3",),
    origin="SEEDS (Gonzalez et al. 2023)",
)
def seeds_3(
    x: Tensor,
    sigmas: Tensor,
    io: StepIO,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r_1: float = 1 / 3,
    r_2: float = 2 / 3,
) -> Stepper:
    """SEEDS-3, Gonzalez et al. (2023), https://arxiv.org/abs/2305.14267: 3-stage exponential SDE solver."""
    if not 0 < r_1 < r_2 < 1:
        raise InputError("r_1", f"need 0 < r_1 < r_2 < 1, got r_1={r_1!r}, r_2={r_2!r}")
    return (yield from _seeds(x, sigmas, io, eta, s_noise, (r_1, r_2)))

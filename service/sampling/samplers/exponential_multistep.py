"""Multistep exponential-integrator samplers: UniPC, DEIS, SA-Solver (see docs/SAMPLERS.md).

All work in lambda = -log(sigma) on k-diffusion's x = x0 + sigma * n (alpha = 1), where the
data-prediction formulas of the papers hold with alpha_t = 1 and sigma_t the VE sigma. History
coefficients are plain floats (Lagrange bases integrated exactly against the exponential kernel).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.polynomial import Polynomial
from torch import Tensor

from ..catalog import INF, Bounds, sampler
from ..stepper import Eval, StepIO, Stepper
from .common import ancestral_noise, check_order, evaluate, noise_at

History = list[tuple[float, Tensor]]  # (lambda, denoised), newest last


def _lagrange(nodes: list[float], j: int) -> Polynomial:
    p = Polynomial([1.0])
    for k, u in enumerate(nodes):
        if k != j:
            p = p * Polynomial([-u, 1.0]) / (nodes[j] - u)
    return p


def exp_poly_integral(p: Polynomial, c: float, a: float, b: float) -> float:
    """Integral over [a, b] of p(u) * exp(c u), exactly: F = exp(c u) * sum_k (-1)^k p^(k)(u) / c^(k+1)."""

    def antiderivative(u: float) -> float:
        if u == -math.inf:
            return 0.0
        total, q, sign = 0.0, p, 1.0
        for k in range(p.degree() + 1):
            total += sign * q(u) / c ** (k + 1)
            q, sign = q.deriv(), -sign
        return math.exp(c * u) * total

    return antiderivative(b) - antiderivative(a)


ORDER3 = {"order": Bounds(lo=1, hi=3, integer=True)}

# UniPC (Zhao et al. 2023, https://arxiv.org/abs/2302.04867), data prediction, B(h) of bh1 or bh2.


def _unipc_update(
    x: Tensor, sigma_t: float, hist: History, order: int, variant: str, model_t: Tensor | None = None
) -> Tensor:
    """UniP (model_t None) or UniC step from hist[-1]'s lambda to sigma_t with ``order`` history terms."""
    lam_s, m0 = hist[-1]
    h = -math.log(sigma_t) - lam_s
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    rks, d1s = [], []
    for k in range(1, order):
        lam_k, m_k = hist[-1 - k]
        rk = (lam_k - lam_s) / h
        rks.append(rk)
        d1s.append((m_k - m0) / rk)
    rks.append(1.0)
    r_mat = np.array([[r**p for r in rks] for p in range(order)])
    b, h_phi_k, factorial = [], h_phi_1 / hh - 1, 1
    for p in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= p + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    x_t = x * math.exp(hh) - m0 * h_phi_1  # sigma_t / sigma_s = exp(-h)
    if model_t is None:  # predictor: order - 1 history differences
        if order == 1:
            return x_t
        rhos = [0.5] if order == 2 else np.linalg.solve(r_mat[:-1, :-1], b[:-1]).tolist()
        return x_t - sum(r * d for r, d in zip(rhos, d1s, strict=True)) * b_h
    rhos_c = [0.5] if order == 1 else np.linalg.solve(r_mat, b).tolist()
    corr = sum((r * d for r, d in zip(rhos_c[:-1], d1s, strict=True)), (model_t - m0) * rhos_c[-1])
    return x_t - corr * b_h


@sampler(
    name="uni_pc_bh2",
    fixed={"variant": "bh2"},
    doc="UniPC with B(h) = expm1(-h) (bh2), Zhao et al. (2023), https://arxiv.org/abs/2302.04867.",
    aliases=("UniPC bh2", "UniPCMultistepScheduler"),
)
@sampler(
    order=3,
    options=ORDER3,
    internal=("variant",),
    aliases=("UniPC", "unipc_bh1"),
    origin="UniPC (Zhao et al. 2023)",
)
def uni_pc(x: Tensor, sigmas: Tensor, io: StepIO, *, order: int = 3, variant: str = "bh1") -> Stepper:
    """UniPC (bh1), Zhao et al. (2023), https://arxiv.org/abs/2302.04867: multistep predictor-corrector.

    ``variant`` "bh2" is B(h) = expm1(-h) (registered as ``uni_pc_bh2``).
    """
    order = check_order("order", order, 3)
    s = sigmas.tolist()
    n = len(s) - 1
    hist: History = []
    x_last: Tensor | None = None
    last_order = 1
    for i in range(n):
        denoised = yield from evaluate(x, sigmas, s, i, io.callback)
        if x_last is not None:  # UniC: correct x_i with the model output at it (no extra call)
            x = _unipc_update(x_last, s[i], hist, last_order, variant, model_t=denoised)
        hist = (
            [*hist[-(order - 1) :], (-math.log(s[i]), denoised)]
            if order > 1
            else [(-math.log(s[i]), denoised)]
        )
        if s[i + 1] == 0:
            x = denoised
            break
        last_order = min(order, n - i, len(hist))  # warm-up, and lower order at the end
        x_last = x
        x = _unipc_update(x, s[i + 1], hist, last_order, variant)
    return x


# DEIS (Zhang & Chen 2022, https://arxiv.org/abs/2204.13902), the log-rho AB variant of diffusers.


def deis_coeffs(log_sigmas: list[float], sigma_s: float, sigma_t: float) -> list[float]:
    """Integral over sigma in [sigma_s, sigma_t] of each node's Lagrange basis in log(sigma), newest first."""
    u_s = math.log(sigma_s)
    nodes = [u - u_s for u in log_sigmas]
    v_t = -math.inf if sigma_t == 0 else math.log(sigma_t) - u_s
    return [sigma_s * exp_poly_integral(_lagrange(nodes, j), 1.0, 0.0, v_t) for j in range(len(nodes))]


@sampler(
    order=3,
    options={"max_order": Bounds(lo=1, hi=3, integer=True)},
    aliases=("DEIS", "DEISMultistepScheduler"),
    origin="DEIS (Zhang & Chen 2022)",
)
def deis(x: Tensor, sigmas: Tensor, io: StepIO, *, max_order: int = 3) -> Stepper:
    """DEIS (rho-AB, log-rho Lagrange), Zhang & Chen (2022), https://arxiv.org/abs/2204.13902."""
    max_order = check_order("max_order", max_order, 3)
    s = sigmas.tolist()
    n = len(s) - 1
    eps: list[tuple[float, Tensor]] = []  # (log sigma, eps), newest last
    for i in range(n):
        denoised = yield from evaluate(x, sigmas, s, i, io.callback)
        eps = (
            [*eps[-(max_order - 1) :], (math.log(s[i]), (x - denoised) / s[i])]
            if max_order > 1
            else [(math.log(s[i]), (x - denoised) / s[i])]
        )
        order = len(eps)
        if n < 15:  # diffusers' lower_order_final for short schedules
            order = min(order, n - i, 2) if i >= n - 2 else order
        hist = eps[-order:]
        coeffs = deis_coeffs([u for u, _ in reversed(hist)], s[i], s[i + 1])
        x = x + sum(c * e for c, (_, e) in zip(coeffs, reversed(hist), strict=True))
    return x


# SA-Solver (Xue et al. 2023, https://arxiv.org/abs/2309.05019), data prediction.


def sa_coeffs(lams: list[float], lam_t: float, h: float, tau: float) -> list[float]:
    """(1 + tau^2) * integral over [lam_t - h, lam_t] of exp((1+tau^2)(lam - lam_t)) * Lagrange basis_j."""
    c = 1 + tau**2
    nodes = [lam - lam_t for lam in lams]
    return [c * exp_poly_integral(_lagrange(nodes, j), c, -h, 0.0) for j in range(len(nodes))]


def _sa_update(
    x: Tensor,
    sigma_s: float,
    sigma_t: float,
    hist: History,
    order: int,
    tau: float,
    noise: Tensor | None,
    pred: bool,
) -> Tensor:
    lam_s, lam_t = -math.log(sigma_s), -math.log(sigma_t)
    h, c = lam_t - lam_s, 1 + tau**2
    used = hist[-order:]
    coeffs = sa_coeffs([lam for lam, _ in reversed(used)], lam_t, h, tau)
    if order == 2:  # the O(h^3) few-step refinement of the SA-Solver paper's code (as UniPC's)
        core = (h * c - 1 + math.exp(-c * h)) / c**2
        extra = (h**2 / 2 - core) / (lam_s - hist[-2][0]) if pred else h / 2 - core / h
        coeffs[0] += c * extra
        coeffs[1] -= c * extra
    out = x * (sigma_t / sigma_s * math.exp(-(tau**2) * h))
    out = out + sum(k * d for k, (_, d) in zip(coeffs, reversed(used), strict=True))
    if noise is not None and tau > 0:
        out = out + noise * (sigma_t * math.sqrt(-math.expm1(-2 * tau**2 * h)))
    return out


_SA = {
    "predictor_order": Bounds(lo=1, hi=4, integer=True),
    "corrector_order": Bounds(lo=1, hi=4, integer=True),
    # diffusers' / ComfyUI's default noise window (SD timesteps 200..800), as the samplers' defaults
    "tau_sigma_lo": Bounds(lo=0.0, hi=INF),
    "tau_sigma_hi": Bounds(lo=0.0, hi=INF),
}


def _pece_nfe(steps: int, opts: Mapping[str, Any]) -> int:
    return 2 * steps - 1 if steps > 1 else 1


@sampler(
    name="sa_solver_pece",
    fixed={"pece": True},
    doc=(
        "SA-Solver in PECE mode (Xue et al. 2023): a second model call at each corrected point.\n\n"
        "Options and the default noise window (0.5716..5.112, diffusers' and ComfyUI's) as ``sa_solver``."
    ),
    nfe_per_step=2,
    nfe=_pece_nfe,
    aliases=("SA-Solver PECE",),
)
@sampler(
    order=3,
    noise="gaussian",
    stochastic=True,
    options=_SA,
    internal=("pece",),
    aliases=("SA-Solver", "SASolverScheduler"),
    origin="SA-Solver (Xue et al. 2023)",
)
def sa_solver(
    x: Tensor,
    sigmas: Tensor,
    io: StepIO,
    *,
    predictor_order: int = 3,
    corrector_order: int = 4,
    eta: float = 1.0,
    s_noise: float = 1.0,
    tau_sigma_lo: float = 0.5716,
    tau_sigma_hi: float = 5.112,
    pece: bool = False,
) -> Stepper:
    """SA-Solver, Xue et al. (2023), https://arxiv.org/abs/2309.05019: stochastic Adams predictor-corrector.

    tau = eta while tau_sigma_lo <= sigma <= tau_sigma_hi, else 0 (eta = 0: the ODE). The default window
    is diffusers' and ComfyUI's default (SD timesteps 200..800: sigma 0.5717..5.111, rounded outward);
    noise at every sigma (tau_sigma_lo=0, tau_sigma_hi=inf) is unstable at few steps. ``pece``: evaluate
    again at each corrected point (registered as ``sa_solver_pece``).
    """
    p_order = check_order("predictor_order", predictor_order, 4)
    c_order = check_order("corrector_order", corrector_order, 4)
    noise_sampler = ancestral_noise(x, io.noise_sampler, eta, s_noise)
    s = sigmas.tolist()
    n = len(s) - 1
    keep = max(p_order, c_order - 1, 2)
    hist: History = []
    x_last: Tensor | None = None
    noise: Tensor | None = None
    tau = 0.0
    last_c_order = 1
    for i in range(n):
        denoised = yield from evaluate(x, sigmas, s, i, io.callback)
        if x_last is not None:  # SA-Corrector with the model output at the predicted point
            x = _sa_update(
                x_last, s[i - 1], s[i], [*hist, (-math.log(s[i]), denoised)], last_c_order, tau, noise, False
            )
            if pece:  # evaluate again at the corrected point
                denoised = yield Eval(x, sigmas[i], i)
        hist = [*hist[-(keep - 1) :], (-math.log(s[i]), denoised)]
        tau = eta if tau_sigma_lo <= s[i] <= tau_sigma_hi else 0.0
        noise = noise_at(noise_sampler, sigmas, s[i], s[i + 1]) * s_noise if eta > 0 else None
        if s[i + 1] == 0:
            x = denoised
            break
        order = min(p_order, n - i, i + 1)
        last_c_order = min(c_order, n - i + 1, i + 2)
        x_last = x
        x = _sa_update(x, s[i], s[i + 1], hist, order, tau, noise, True)
    return x

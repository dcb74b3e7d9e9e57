"""Linear multistep methods on d = (x - denoised) / sigma in sigma: LMS, PLMS, iPNDM, gradient estimation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import Tensor

from ..catalog import Bounds, sampler
from ..stepper import Eval, StepIO, Stepper
from .common import check_order, euler_predict, evaluate, report

_GAUSS = {n: np.polynomial.legendre.leggauss(n) for n in range(1, 9)}


def linear_multistep_coeff(order: int, t: Any, i: int, j: int) -> float:
    """Integral over [t_i, t_{i+1}] of the Lagrange basis polynomial of node t_{i-j}.

    Gauss-Legendre with ``order`` nodes is exact for this degree order-1 polynomial, and evaluating
    the product form at the nodes avoids expanding it into ill-conditioned monomials.
    """
    if order - 1 > i:
        raise ValueError(f"order {order} too high for step {i}")
    nodes, weights = _GAUSS[order]
    a, b = t[i], t[i + 1]
    tau = (b - a) / 2 * nodes + (a + b) / 2
    prod = np.ones_like(tau)
    for k in range(order):
        if k != j:
            prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
    return float((b - a) / 2 * np.dot(weights, prod))


@sampler(
    order=4,
    options={"order": Bounds(lo=1, hi=8, integer=True)},
    aliases=("LMS", "k_lms", "LMSDiscreteScheduler"),
    origin="k-diffusion",
)
def lms(x: Tensor, sigmas: Tensor, io: StepIO, *, order: int = 4) -> Stepper:
    """Linear multistep (Adams-Bashforth in sigma) of the given order, as in k-diffusion."""
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 8:
        raise ValueError(f"order must be an integer in [1, 8], got {order!r}")
    s = sigmas.tolist()
    ds: list[Tensor] = []
    for i in range(len(s) - 1):
        denoised = yield Eval(x, sigmas[i], i)
        ds.append((x - denoised) / s[i])
        if len(ds) > order:
            ds.pop(0)
        report(io.callback, x, i, sigmas, s[i], denoised)
        cur_order = min(i + 1, order)
        for j, d in enumerate(reversed(ds)):
            x = x + d * linear_multistep_coeff(cur_order, s, i, j)
    return x


# Adams-Bashforth coefficients for equal steps, newest derivative first (orders 1-4).
AB_COEFFS: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def _plms_nfe(steps: int, opts: Mapping[str, Any]) -> int:
    return steps + 1 if steps > 1 else 1


@sampler(order=4, nfe=_plms_nfe, aliases=("PLMS", "pndm", "PNDMScheduler"), origin="PNDM (Liu et al. 2022)")
def plms(x: Tensor, sigmas: Tensor, io: StepIO) -> Stepper:
    """Pseudo linear multistep (PLMS/PNDM), Liu et al. (2022), https://arxiv.org/abs/2202.09778.

    A Heun (pseudo improved Euler) first step, then Adams-Bashforth 2-4 with equal-step
    coefficients on eps = d; one extra model call in all (as in LDM, A1111 and diffusers).
    """
    s = sigmas.tolist()
    ds: list[Tensor] = []
    for i in range(len(s) - 1):
        denoised = yield from evaluate(x, sigmas, s, i, io.callback)
        d = (x - denoised) / s[i]
        dt = s[i + 1] - s[i]
        if not ds and s[i + 1] > 0:
            _, d_2 = yield from euler_predict(x, d, dt, s[i + 1], sigmas[i + 1], i)
            x = x + (d + d_2) * (dt / 2)
            ds.append(d)
            continue
        ds = [*ds[-3:], d]
        x = x + sum(c * dj for c, dj in zip(AB_COEFFS[len(ds)], reversed(ds), strict=True)) * dt
    return x


@sampler(
    order=4,
    options={"max_order": Bounds(lo=1, hi=4, integer=True)},
    aliases=("iPNDM", "IPNDMScheduler"),
    origin="iPNDM (Zhang & Chen 2022)",
)
def ipndm(x: Tensor, sigmas: Tensor, io: StepIO, *, max_order: int = 4) -> Stepper:
    """Improved PNDM (Zhang & Chen 2022, https://arxiv.org/abs/2204.13902): AB 1-4 on d, lower-order start."""
    max_order = check_order("max_order", max_order, len(AB_COEFFS))
    s = sigmas.tolist()
    ds: list[Tensor] = []
    for i in range(len(s) - 1):
        denoised = yield from evaluate(x, sigmas, s, i, io.callback)
        ds = [*ds[-(max_order - 1) :], (x - denoised) / s[i]] if max_order > 1 else [(x - denoised) / s[i]]
        coeffs = AB_COEFFS[len(ds)]
        x = x + sum(c * dj for c, dj in zip(coeffs, reversed(ds), strict=True)) * (s[i + 1] - s[i])
    return x


@sampler(
    order=4,
    options={"max_order": Bounds(lo=1, hi=4, integer=True)},
    aliases=("iPNDM v",),
    origin="iPNDM-v (Zhang & Chen 2022)",
)
def ipndm_v(x: Tensor, sigmas: Tensor, io: StepIO, *, max_order: int = 4) -> Stepper:
    """iPNDM with variable step sizes (Zhang & Chen 2022): exact variable-step Adams-Bashforth in sigma."""
    max_order = check_order("max_order", max_order, len(AB_COEFFS))
    # The variable-step AB coefficients are the integrals of the Lagrange basis: k-diffusion's LMS.
    return (yield from lms(x, sigmas, io, order=max_order))


@sampler(order=1, options={"ge_gamma": Bounds(lo=-10.0, hi=10.0)}, origin="Permenter & Yuan (2023)")
def gradient_estimation(x: Tensor, sigmas: Tensor, io: StepIO, *, ge_gamma: float = 2.0) -> Stepper:
    """Gradient estimation, Permenter & Yuan (2023), https://arxiv.org/abs/2306.04848."""
    if not math.isfinite(ge_gamma):
        raise ValueError(f"ge_gamma must be finite, got {ge_gamma!r}")
    s = sigmas.tolist()
    old_d: Tensor | None = None
    for i in range(len(s) - 1):
        denoised = yield from evaluate(x, sigmas, s, i, io.callback)
        d = (x - denoised) / s[i]
        d_bar = d if old_d is None else d * ge_gamma + old_d * (1 - ge_gamma)
        x = x + d_bar * (s[i + 1] - s[i])
        old_d = d
    return x

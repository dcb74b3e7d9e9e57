"""RES single-step solvers (Zhang et al. 2023, https://arxiv.org/abs/2308.02157): exponential
Runge-Kutta methods whose weights satisfy the order conditions exactly, not only as h -> 0.

In lambda = -log(sigma) the probability-flow ODE on k-diffusion's x = x0 + sigma * n is
dx/dlambda = D(x; lambda) - x, so over a step of size h = log(sigma / sigma_next)

    x(lambda + h) = e^-h x(lambda) + integral_0^h e^-(h - tau) D(lambda + tau) dtau.

With phi_1(z) = (e^z - 1) / z and phi_2(z) = (e^z - 1 - z) / z^2, the integral of e^-(h - tau)
against 1 and tau / h is h phi_1(-h) and h phi_2(-h). A 2-stage method evaluates D at x and at
the intermediate point c2 * h along, and is of order 2 when its weights b1, b2 satisfy

    b1 + b2 = phi_1(-h)      and      c2 b2 = phi_2(-h)

(Hochbruck & Ostermann's stiff order conditions, which RES imposes for every h; DPM-Solver++(2S)
meets the second only as h -> 0).
"""

from __future__ import annotations

import math

from torch import Tensor

from ..catalog import Bounds, sampler
from ..errors import InputError
from ..stepper import Eval, StepIO, Stepper
from .common import evaluate_h


@sampler(
    order=2,
    nfe_per_step=2,
    options={"c2": Bounds(lo=0.01, hi=1.0)},
    aliases=("RES 2S", "res2s"),
    origin="RES (Zhang et al. 2023)",
)
def res_2s(x: Tensor, sigmas: Tensor, io: StepIO, *, c2: float = 0.5) -> Stepper:
    """RES 2-stage exponential integrator, Zhang et al. (2023), https://arxiv.org/abs/2308.02157.

    Stage 2 is the exact step of the linear part to lambda + c2 h with D held at its first value
    (DPM-Solver++(1) to sigma * e^(-c2 h)); the step combines both predictions with
    b2 = phi_2(-h) / c2, b1 = phi_1(-h) - b2. The last step to sigma = 0 returns the denoised
    prediction (one model call).
    """
    if not 0 < c2 <= 1:
        raise InputError("c2", f"c2 must be in (0, 1], got {c2!r}")
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised, h = yield from evaluate_h(x, sigmas, s, i, io.callback)
        if h is None:
            x = denoised
            continue
        sigma_2 = s[i] * math.exp(-c2 * h)
        x_2 = x * (sigma_2 / s[i]) - denoised * math.expm1(-c2 * h)
        denoised_2 = yield Eval(x_2, sigmas.new_tensor(sigma_2), i)
        w_2 = (h + math.expm1(-h)) / (h * c2)  # h * b2 = h * phi_2(-h) / c2
        w_1 = -math.expm1(-h) - w_2  # h * b1 = h * phi_1(-h) - h * b2
        x = x * (s[i + 1] / s[i]) + denoised * w_1 + denoised_2 * w_2
    return x

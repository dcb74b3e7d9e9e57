"""k-diffusion's samplers, each written once as a stepper (see :mod:`.stepper`).

A stepper ``name(x, sigmas, *, callback=None, noise_sampler=None, **options)`` yields an
:class:`Eval` per model evaluation and returns the final x. ``x`` is already scaled to
``sigmas[0]``. Option names and defaults are k-diffusion 0.1.1's. Differences, on purpose:
euler/heun/dpm_2 draw churn noise only when they use it; the SDE samplers default to seeded
Brownian-bridge noise and accept one-step and empty schedules.

Noise levels are handled as Python floats (``s = sigmas.tolist()``) and scalar factors are
folded before they touch x: the same formulas as k-diffusion with fewer tensor operations,
which is where a sampler's own time goes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .noise import BrownianNoiseSampler, NoiseSampler, default_noise_sampler
from .stepper import Callback, Eval, Stepper

INF = float("inf")


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step, as k-diffusion's get_ancestral_step, in floats."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def _report(
    callback: Callback | None, x: Tensor, i: int, sigmas: Tensor, sigma_hat: float, denoised: Tensor
) -> None:
    if callback is not None:
        sigma = sigmas[i]
        callback(
            {"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma.new_tensor(sigma_hat), "denoised": denoised}
        )


def _noise(noise_sampler: NoiseSampler, sigmas: Tensor, sigma: float, sigma_next: float) -> Tensor:
    # Noise samplers get tensors, like k-diffusion's (a Brownian tree keys on their exact values).
    return noise_sampler(sigmas.new_tensor(sigma), sigmas.new_tensor(sigma_next))


def _churn(
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
        eps = torch.randn_like(x) if noise_sampler is None else _noise(noise_sampler, sigmas, s[i], sigma_hat)
        x = x + eps * (s_noise * (sigma_hat**2 - s[i] ** 2) ** 0.5)
    return x, sigma_hat


def _brownian(x: Tensor, sigmas: Tensor, noise_sampler: NoiseSampler | None) -> NoiseSampler:
    if noise_sampler is not None:
        return noise_sampler
    positive = sigmas[sigmas > 0]
    if positive.numel() == 0:
        return default_noise_sampler(x)  # never called: nothing to sample
    return BrownianNoiseSampler(x, positive.min(), sigmas.max())


def _check_nonneg(**values: float) -> None:
    for name, v in values.items():
        if not math.isfinite(float(v)) or float(v) < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


def euler(
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
    """Euler method, Algorithm 2 of Karras et al. (2022), https://arxiv.org/abs/2206.00364."""
    _check_nonneg(s_churn=s_churn, s_noise=s_noise)
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        x, sigma_hat = _churn(x, sigmas, s, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = yield Eval(x, sigmas.new_tensor(sigma_hat), i)
        _report(callback, x, i, sigmas, sigma_hat, denoised)
        d = (x - denoised) / sigma_hat
        x = x + d * (s[i + 1] - sigma_hat)
    return x


def euler_ancestral(
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Stepper:
    """Ancestral sampling with Euler steps (Song et al. 2021 / Crowson)."""
    _check_nonneg(eta=eta, s_noise=s_noise)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = yield Eval(x, sigmas[i], i)
        sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
        _report(callback, x, i, sigmas, s[i], denoised)
        d = (x - denoised) / s[i]
        x = x + d * (sigma_down - s[i])
        if s[i + 1] > 0:
            x = x + _noise(noise_sampler, sigmas, s[i], s[i + 1]) * (s_noise * sigma_up)
    return x


def heun(
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
    """Heun's method, Algorithm 2 of Karras et al. (2022); Euler on the last step to sigma = 0."""
    _check_nonneg(s_churn=s_churn, s_noise=s_noise)
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        x, sigma_hat = _churn(x, sigmas, s, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = yield Eval(x, sigmas.new_tensor(sigma_hat), i)
        _report(callback, x, i, sigmas, sigma_hat, denoised)
        d = (x - denoised) / sigma_hat
        dt = s[i + 1] - sigma_hat
        if s[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = yield Eval(x_2, sigmas[i + 1], i)
            d_2 = (x_2 - denoised_2) / s[i + 1]
            x = x + (d + d_2) * (dt / 2)
    return x


def dpm_2(
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
    """DPM-Solver-2 as in Karras et al. (2022): a midpoint step in log sigma."""
    _check_nonneg(s_churn=s_churn, s_noise=s_noise)
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        x, sigma_hat = _churn(x, sigmas, s, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = yield Eval(x, sigmas.new_tensor(sigma_hat), i)
        _report(callback, x, i, sigmas, sigma_hat, denoised)
        d = (x - denoised) / sigma_hat
        if s[i + 1] == 0:
            x = x + d * (s[i + 1] - sigma_hat)
        else:
            sigma_mid = math.sqrt(sigma_hat * s[i + 1])  # midpoint in log sigma
            x_2 = x + d * (sigma_mid - sigma_hat)
            denoised_2 = yield Eval(x_2, sigmas.new_tensor(sigma_mid), i)
            d_2 = (x_2 - denoised_2) / sigma_mid
            x = x + d_2 * (s[i + 1] - sigma_hat)
    return x


def dpm_2_ancestral(
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Stepper:
    """Ancestral sampling with DPM-Solver-2 steps."""
    _check_nonneg(eta=eta, s_noise=s_noise)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = yield Eval(x, sigmas[i], i)
        sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
        _report(callback, x, i, sigmas, s[i], denoised)
        d = (x - denoised) / s[i]
        if sigma_down == 0:
            x = x + d * (sigma_down - s[i])
        else:
            sigma_mid = math.sqrt(s[i] * sigma_down)  # midpoint in log sigma
            x_2 = x + d * (sigma_mid - s[i])
            denoised_2 = yield Eval(x_2, sigmas.new_tensor(sigma_mid), i)
            d_2 = (x_2 - denoised_2) / sigma_mid
            x = x + d_2 * (sigma_down - s[i])
        if s[i + 1] > 0:
            x = x + _noise(noise_sampler, sigmas, s[i], s[i + 1]) * (s_noise * sigma_up)
    return x


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


def lms(
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    order: int = 4,
) -> Stepper:
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
        _report(callback, x, i, sigmas, s[i], denoised)
        cur_order = min(i + 1, order)
        for j, d in enumerate(reversed(ds)):
            x = x + d * linear_multistep_coeff(cur_order, s, i, j)
    return x


def dpmpp_2s_ancestral(
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Stepper:
    """Ancestral sampling with DPM-Solver++(2S) steps, Lu et al. (2022), https://arxiv.org/abs/2211.01095."""
    _check_nonneg(eta=eta, s_noise=s_noise)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = yield Eval(x, sigmas[i], i)
        sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
        _report(callback, x, i, sigmas, s[i], denoised)
        if sigma_down == 0:
            x = x + (x - denoised) * ((sigma_down - s[i]) / s[i])
        else:
            h = math.log(s[i] / sigma_down)  # t = -log(sigma)
            sigma_s = s[i] * math.exp(-h / 2)
            x_2 = x * (sigma_s / s[i]) - denoised * math.expm1(-h / 2)
            denoised_2 = yield Eval(x_2, sigmas.new_tensor(sigma_s), i)
            x = x * (sigma_down / s[i]) - denoised_2 * math.expm1(-h)
        if s[i + 1] > 0:
            x = x + _noise(noise_sampler, sigmas, s[i], s[i + 1]) * (s_noise * sigma_up)
    return x


def dpmpp_sde(
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 1 / 2,
) -> Stepper:
    """DPM-Solver++ (stochastic, two stages per step with Brownian noise), Lu et al. (2022)."""
    _check_nonneg(eta=eta, s_noise=s_noise)
    if not 0 < r <= 1:
        raise ValueError(f"r must be in (0, 1], got {r!r}")
    noise_sampler = _brownian(x, sigmas, noise_sampler)
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = yield Eval(x, sigmas[i], i)
        _report(callback, x, i, sigmas, s[i], denoised)
        if s[i + 1] == 0:
            x = x + (x - denoised) * ((s[i + 1] - s[i]) / s[i])
            continue
        h = math.log(s[i] / s[i + 1])
        sigma_s = s[i] * math.exp(-h * r)
        fac = 1 / (2 * r)
        # Stage 1: to the intermediate sigma_s, ancestrally.
        sd, su = ancestral_step(s[i], sigma_s, eta)
        x_2 = x * (sd / s[i]) - denoised * (sd / s[i] - 1)  # DPM-Solver++(1) to sd: expm1(log(sd / sigma))
        x_2 = x_2 + _noise(noise_sampler, sigmas, s[i], sigma_s) * (s_noise * su)
        denoised_2 = yield Eval(x_2, sigmas.new_tensor(sigma_s), i)
        # Stage 2: the full step with the combined prediction.
        sd, su = ancestral_step(s[i], s[i + 1], eta)
        denoised_d = denoised * (1 - fac) + denoised_2 * fac
        x = x * (sd / s[i]) - denoised_d * (sd / s[i] - 1)
        x = x + _noise(noise_sampler, sigmas, s[i], s[i + 1]) * (s_noise * su)
    return x


def dpmpp_2m(
    x: Tensor, sigmas: Tensor, *, callback: Callback | None = None, noise_sampler: NoiseSampler | None = None
) -> Stepper:
    """DPM-Solver++(2M), Lu et al. (2022), https://arxiv.org/abs/2211.01095."""
    s = sigmas.tolist()
    old_denoised = None
    for i in range(len(s) - 1):
        denoised = yield Eval(x, sigmas[i], i)
        _report(callback, x, i, sigmas, s[i], denoised)
        if s[i + 1] == 0:
            x = denoised  # sigma_next / sigma = 0 and -expm1(-h) = 1
        else:
            h = math.log(s[i] / s[i + 1])
            if old_denoised is None:
                denoised_d = denoised
            else:
                r = math.log(s[i - 1] / s[i]) / h  # h_last / h
                denoised_d = denoised * (1 + 1 / (2 * r)) - old_denoised * (1 / (2 * r))
            x = x * (s[i + 1] / s[i]) - denoised_d * math.expm1(-h)
        old_denoised = denoised
    return x


def dpmpp_2m_sde(
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
) -> Stepper:
    """DPM-Solver++(2M) SDE, Lu et al. (2022); solver_type 'midpoint' or 'heun'."""
    if solver_type not in {"heun", "midpoint"}:
        raise ValueError(f"solver_type must be 'heun' or 'midpoint', got {solver_type!r}")
    _check_nonneg(eta=eta, s_noise=s_noise)
    noise_sampler = _brownian(x, sigmas, noise_sampler)
    s = sigmas.tolist()
    old_denoised: Tensor | None = None
    h_last: float | None = None
    for i in range(len(s) - 1):
        denoised = yield Eval(x, sigmas[i], i)
        _report(callback, x, i, sigmas, s[i], denoised)
        h = None
        if s[i + 1] == 0:
            x = denoised  # the final denoising step
        else:
            h = math.log(s[i] / s[i + 1])
            eta_h = eta * h
            phi_1 = -math.expm1(-h - eta_h)
            x = x * (s[i + 1] / s[i] * math.exp(-eta_h)) + denoised * phi_1
            if old_denoised is not None and h_last is not None:
                r = h_last / h
                coeff = (1 - phi_1 / (h + eta_h)) if solver_type == "heun" else 0.5 * phi_1
                x = x + (denoised - old_denoised) * (coeff / r)
            if eta:
                noise = _noise(noise_sampler, sigmas, s[i], s[i + 1])
                x = x + noise * (s[i + 1] * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise)
        old_denoised, h_last = denoised, h
    return x


def dpmpp_3m_sde(
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Stepper:
    """DPM-Solver++(3M) SDE, Lu et al. (2022), third-order multistep with Brownian noise."""
    _check_nonneg(eta=eta, s_noise=s_noise)
    noise_sampler = _brownian(x, sigmas, noise_sampler)
    s = sigmas.tolist()
    denoised_1: Any = None
    denoised_2: Any = None
    h_1: float | None = None
    h_2: float | None = None
    for i in range(len(s) - 1):
        denoised = yield Eval(x, sigmas[i], i)
        _report(callback, x, i, sigmas, s[i], denoised)
        h = None
        if s[i + 1] == 0:
            x = denoised  # the final denoising step
        else:
            h = math.log(s[i] / s[i + 1])
            h_eta = h * (eta + 1)
            x = x * math.exp(-h_eta) - denoised * math.expm1(-h_eta)
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None and h_1 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + d1 * phi_2 - d2 * phi_3
            elif h_1 is not None:
                x = x + (denoised - denoised_1) * (phi_2 / (h_1 / h))
            if eta:
                noise = _noise(noise_sampler, sigmas, s[i], s[i + 1])
                x = x + noise * (s[i + 1] * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise)
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x

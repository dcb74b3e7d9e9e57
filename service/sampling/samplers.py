"""k-diffusion's samplers, each written once as a stepper (see :mod:`.stepper`).

A stepper ``name(x, sigmas, *, callback=None, noise_sampler=None, **options)`` yields an
:class:`Eval` per model evaluation and returns the final x. ``x`` is already scaled to
``sigmas[0]``. Option names and defaults are k-diffusion 0.1.1's. Differences, on purpose:
euler/heun/dpm_2 draw churn noise only when they use it; the SDE samplers default to seeded
Brownian-bridge noise and accept one-step and empty schedules.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .noise import BrownianNoiseSampler, NoiseSampler, default_noise_sampler
from .stepper import Callback, Eval, Stepper
from .utils import get_ancestral_step, to_d

INF = float("inf")


def _report(
    callback: Callback | None, x: Tensor, i: int, sigma: Tensor, sigma_hat: Tensor, denoised: Tensor
) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


def _churn(
    x: Tensor, sigma: Tensor, gamma: float, s_noise: float, noise_sampler: NoiseSampler | None
) -> tuple[Tensor, Tensor]:
    """Karras 'churn': raise the noise level to sigma_hat = sigma * (1 + gamma) by adding noise."""
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        eps = (torch.randn_like(x) if noise_sampler is None else noise_sampler(sigma, sigma_hat)) * s_noise
        x = x + eps * (sigma_hat**2 - sigma**2) ** 0.5
    return x, sigma_hat


def _gamma(sigmas: Tensor, i: int, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    return min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0


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
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(
            x, sigmas[i], _gamma(sigmas, i, s_churn, s_tmin, s_tmax), s_noise, noise_sampler
        )
        denoised = yield Eval(x, sigma_hat, i)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigmas[i], sigma_hat, denoised)
        x = x + d * (sigmas[i + 1] - sigma_hat)
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
    for i in range(len(sigmas) - 1):
        denoised = yield Eval(x, sigmas[i], i)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
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
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(
            x, sigmas[i], _gamma(sigmas, i, s_churn, s_tmin, s_tmax), s_noise, noise_sampler
        )
        denoised = yield Eval(x, sigma_hat, i)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigmas[i], sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = yield Eval(x_2, sigmas[i + 1], i)
            d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
            x = x + (d + d_2) / 2 * dt
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
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(
            x, sigmas[i], _gamma(sigmas, i, s_churn, s_tmin, s_tmax), s_noise, noise_sampler
        )
        denoised = yield Eval(x, sigma_hat, i)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigmas[i], sigma_hat, denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            sigma_mid = sigma_hat.log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigma_hat)
            denoised_2 = yield Eval(x_2, sigma_mid, i)
            x = x + to_d(x_2, sigma_mid, denoised_2) * (sigmas[i + 1] - sigma_hat)
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
    for i in range(len(sigmas) - 1):
        denoised = yield Eval(x, sigmas[i], i)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            denoised_2 = yield Eval(x_2, sigma_mid, i)
            x = x + to_d(x_2, sigma_mid, denoised_2) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def linear_multistep_coeff(order: int, t: np.ndarray, i: int, j: int) -> float:
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


_GAUSS = {n: np.polynomial.legendre.leggauss(n) for n in range(1, 9)}


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
    sigmas_cpu = sigmas.detach().cpu().double().numpy()
    ds: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = yield Eval(x, sigmas[i], i)
        ds.append(to_d(x, sigmas[i], denoised))
        if len(ds) > order:
            ds.pop(0)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        cur_order = min(i + 1, order)
        coeffs = [linear_multistep_coeff(cur_order, sigmas_cpu, i, j) for j in range(cur_order)]
        x = x + sum(coeff * d for coeff, d in zip(coeffs, reversed(ds), strict=False))
    return x


def _sigma_fn(t: Tensor) -> Tensor:
    return t.neg().exp()


def _t_fn(sigma: Tensor) -> Tensor:
    return sigma.log().neg()


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
    for i in range(len(sigmas) - 1):
        denoised = yield Eval(x, sigmas[i], i)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = _t_fn(sigmas[i]), _t_fn(sigma_down)
            h = t_next - t
            s = t + h / 2
            x_2 = (_sigma_fn(s) / _sigma_fn(t)) * x - (-h / 2).expm1() * denoised
            denoised_2 = yield Eval(x_2, _sigma_fn(s), i)
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
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
    for i in range(len(sigmas) - 1):
        denoised = yield Eval(x, sigmas[i], i)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            continue
        t, t_next = _t_fn(sigmas[i]), _t_fn(sigmas[i + 1])
        h = t_next - t
        s = t + h * r
        fac = 1 / (2 * r)
        # Stage 1: to the intermediate time s.
        sd, su = get_ancestral_step(_sigma_fn(t), _sigma_fn(s), eta)
        s_ = _t_fn(sd)
        x_2 = (_sigma_fn(s_) / _sigma_fn(t)) * x - (t - s_).expm1() * denoised
        x_2 = x_2 + noise_sampler(_sigma_fn(t), _sigma_fn(s)) * s_noise * su
        denoised_2 = yield Eval(x_2, _sigma_fn(s), i)
        # Stage 2: the full step with the combined prediction.
        sd, su = get_ancestral_step(_sigma_fn(t), _sigma_fn(t_next), eta)
        t_next_ = _t_fn(sd)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (_sigma_fn(t_next_) / _sigma_fn(t)) * x - (t - t_next_).expm1() * denoised_d
        x = x + noise_sampler(_sigma_fn(t), _sigma_fn(t_next)) * s_noise * su
    return x


def dpmpp_2m(
    x: Tensor, sigmas: Tensor, *, callback: Callback | None = None, noise_sampler: NoiseSampler | None = None
) -> Stepper:
    """DPM-Solver++(2M), Lu et al. (2022), https://arxiv.org/abs/2211.01095."""
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = yield Eval(x, sigmas[i], i)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        t, t_next = _t_fn(sigmas[i]), _t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            r = (t - _t_fn(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised_d
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
    old_denoised: Tensor | None = None
    h_last: Tensor | None = None
    for i in range(len(sigmas) - 1):
        denoised = yield Eval(x, sigmas[i], i)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        h = None
        if sigmas[i + 1] == 0:
            x = denoised  # the final denoising step
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old_denoised is not None and h_last is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r) * (
                        denoised - old_denoised
                    )
                else:
                    x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta:
                noise = noise_sampler(sigmas[i], sigmas[i + 1])
                x = x + noise * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt() * s_noise
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
    denoised_1: Any = None
    denoised_2: Any = None
    h_1: Any = None
    h_2: Any = None
    for i in range(len(sigmas) - 1):
        denoised = yield Eval(x, sigmas[i], i)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        h = None
        if sigmas[i + 1] == 0:
            x = denoised  # the final denoising step
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                d = (denoised - denoised_1) / (h_1 / h)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * d
            if eta:
                noise = noise_sampler(sigmas[i], sigmas[i + 1])
                x = x + noise * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x

"""Schedules beyond k-diffusion's: beta, linear_quadratic, kl_optimal, align_your_steps, laplace.

Same convention as :mod:`.schedules`: ``get_sigmas_<name>(n, sigma_min, sigma_max, ..., device)``
returns n descending sigmas and a final 0. See docs/SAMPLERS.md for where each comes from and
where ours differs from a peer's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from .schedules import Device, Schedule, _check_n, _check_positive, _check_range
from .utils import append_zero

# Align Your Steps (Sabour et al. 2024, https://arxiv.org/abs/2404.14507): NVIDIA's published
# 10-step noise levels (11 points, the last replaced by 0 when sampling).
AYS_TABLES: dict[str, tuple[float, ...]] = {
    "sd15": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
    "svd": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
}


def _log_ramp(ramp: np.ndarray, sigma_min: float, sigma_max: float) -> np.ndarray:
    """Map a ramp in [0, 1] (1 = sigma_max) onto [sigma_min, sigma_max] uniformly in log sigma."""
    return np.exp(math.log(sigma_min) + ramp * (math.log(sigma_max) - math.log(sigma_min)))


def _finish(sigmas: np.ndarray, device: Device) -> Tensor:
    return append_zero(torch.as_tensor(sigmas, dtype=torch.get_default_dtype())).to(device)


def get_sigmas_beta(
    n: int, sigma_min: float, sigma_max: float, alpha: float = 0.6, beta: float = 0.6, device: Device = "cpu"
) -> Tensor:
    """Beta schedule (Lee et al. 2024, https://arxiv.org/abs/2407.12173): Beta(alpha, beta) quantiles.

    The quantiles of 1 - k/n are spread over the range uniformly in log sigma (a discrete model's
    timestep index is close to that); ComfyUI spreads them over timestep indices, diffusers over sigma.
    """
    _check_n(n)
    _check_range(sigma_min, sigma_max)
    _check_positive("alpha", alpha)
    _check_positive("beta", beta)
    ramp = stats.beta.ppf(1 - np.arange(n) / max(n - 1, 1), alpha, beta) if n > 1 else np.ones(1)
    return _finish(_log_ramp(ramp, sigma_min, sigma_max), device)


def get_sigmas_kl_optimal(n: int, sigma_min: float, sigma_max: float, device: Device = "cpu") -> Tensor:
    """KL-optimal schedule (Sabour et al. 2024, AYS appendix): uniform in arctan(sigma)."""
    _check_n(n)
    _check_range(sigma_min, sigma_max)
    t = np.linspace(0, 1, n)
    return _finish(np.tan(t * math.atan(sigma_min) + (1 - t) * math.atan(sigma_max)), device)


def get_sigmas_linear_quadratic(
    n: int,
    sigma_min: float,
    sigma_max: float,
    threshold_noise: float = 0.025,
    linear_steps: int | None = None,
    device: Device = "cpu",
) -> Tensor:
    """Linear-then-quadratic schedule (Movie Gen / Mochi, via ComfyUI): sigma = sigma_max * (1 - u).

    u rises linearly to ``threshold_noise`` over ``linear_steps`` (default n // 2) steps, then as the
    C1-continuous quadratic reaching 1 at step n. sigma_min is not used.
    """
    _check_n(n)
    _check_range(sigma_min, sigma_max)
    if not 0 < threshold_noise < 1:
        raise ValueError(f"threshold_noise must be in (0, 1), got {threshold_noise!r}")
    if n == 1:
        return _finish(np.array([sigma_max]), device)
    lin = n // 2 if linear_steps is None else int(linear_steps)
    if not 1 <= lin < n:
        raise ValueError(f"linear_steps must be in [1, {n - 1}] for {n} steps, got {linear_steps!r}")
    i = np.arange(n, dtype=np.float64)
    slope, q = threshold_noise / lin, n - lin
    if slope * q >= 2 * (1 - threshold_noise):  # the quadratic would turn back before step n
        raise ValueError(
            f"threshold_noise={threshold_noise} with linear_steps={lin} of {n} steps does not descend; "
            "use a smaller threshold_noise or more linear_steps"
        )
    a = (1 - threshold_noise - slope * q) / q**2
    u = np.where(i < lin, i * slope, threshold_noise + slope * (i - lin) + a * (i - lin) ** 2)
    return _finish(sigma_max * (1 - u), device)


def loglinear_interp(values: tuple[float, ...] | list[float], n: int) -> np.ndarray:
    """Resample a descending list to n points, linearly in log value over a uniform index."""
    ys = np.log(np.asarray(values, dtype=np.float64)[::-1])
    xs = np.linspace(0, 1, len(ys))
    return np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1].copy()


def get_sigmas_align_your_steps(
    n: int,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    model: str = "sd15",
    device: Device = "cpu",
) -> Tensor:
    """Align Your Steps (Sabour et al. 2024): NVIDIA's tables, log-linearly interpolated to n steps.

    n steps use n + 1 points of the (interpolated) table and replace the last by 0 (ComfyUI's
    convention); the model's sigma range is not used.
    """
    _check_n(n)
    if model not in AYS_TABLES:
        raise ValueError(f"model must be one of {sorted(AYS_TABLES)}, got {model!r}")
    table = AYS_TABLES[model]
    pts = np.asarray(table) if n + 1 == len(table) else loglinear_interp(table, n + 1)
    return _finish(pts[:-1], device)


def get_sigmas_laplace(
    n: int, sigma_min: float, sigma_max: float, mu: float = 0.0, beta: float = 0.5, device: Device = "cpu"
) -> Tensor:
    """Laplace schedule (Hang et al. 2024, https://arxiv.org/abs/2407.03297): quantiles of log sigma.

    The quantiles are taken between the distribution's CDF at log sigma_max and at log sigma_min
    (ComfyUI clamps the untruncated ones, which repeats sigmas when the range is narrow).
    """
    _check_n(n)
    _check_range(sigma_min, sigma_max)
    _check_positive("beta", beta)
    if not math.isfinite(mu):
        raise ValueError(f"mu must be finite, got {mu!r}")
    dist = stats.laplace(loc=mu, scale=beta)
    p_hi, p_lo = dist.cdf(math.log(sigma_max)), dist.cdf(math.log(sigma_min))
    p = np.linspace(p_hi, p_lo, n)
    log_sigma = np.clip(dist.ppf(p), math.log(sigma_min), math.log(sigma_max))
    log_sigma[0], log_sigma[-1] = math.log(sigma_max), math.log(sigma_min) if n > 1 else math.log(sigma_max)
    return _finish(np.exp(log_sigma), device)


@dataclass(frozen=True)
class BetaSchedule(Schedule):
    sigma_min: float
    sigma_max: float
    alpha: float = 0.6
    beta: float = 0.6

    def __call__(self, n: int, device: Device = "cpu") -> Tensor:
        return get_sigmas_beta(n, self.sigma_min, self.sigma_max, self.alpha, self.beta, device)


@dataclass(frozen=True)
class KLOptimalSchedule(Schedule):
    sigma_min: float
    sigma_max: float

    def __call__(self, n: int, device: Device = "cpu") -> Tensor:
        return get_sigmas_kl_optimal(n, self.sigma_min, self.sigma_max, device)


@dataclass(frozen=True)
class AlignYourStepsSchedule(Schedule):
    model: str = "sd15"

    def __call__(self, n: int, device: Device = "cpu") -> Tensor:
        return get_sigmas_align_your_steps(n, model=self.model, device=device)

"""Noise schedules: ``get_sigmas_*`` functions (k-diffusion names) and schedule objects.

Every function returns a descending 1-D tensor of ``n`` sigmas followed by a final 0.
Schedule objects carry their parameters and are called with the step count, so that
``KSampler(model, schedule=KarrasSchedule(0.002, 80.0, rho=7.0))`` works.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .utils import append_zero

Device = torch.device | str


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"steps must be an integer >= 1, got {n!r}")


def _check_range(sigma_min: float, sigma_max: float) -> None:
    for name, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
        if not math.isfinite(float(v)) or float(v) <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    if float(sigma_min) >= float(sigma_max):
        raise ValueError(f"sigma_min ({sigma_min}) must be < sigma_max ({sigma_max})")


def _check_positive(name: str, v: float) -> None:
    if not math.isfinite(float(v)) or float(v) <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")


def get_sigmas_karras(
    n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device: Device = "cpu"
) -> Tensor:
    """Karras et al. (2022) schedule: uniform in sigma^(1/rho)."""
    _check_n(n)
    _check_range(sigma_min, sigma_max)
    _check_positive("rho", rho)
    ramp = torch.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return append_zero(sigmas).to(device)


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float, device: Device = "cpu") -> Tensor:
    """Schedule uniform in log sigma."""
    _check_n(n)
    _check_range(sigma_min, sigma_max)
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, device=device).exp()
    return append_zero(sigmas)


def get_sigmas_polyexponential(
    n: int, sigma_min: float, sigma_max: float, rho: float = 1.0, device: Device = "cpu"
) -> Tensor:
    """Polynomial in log sigma; rho=1 is the exponential schedule."""
    _check_n(n)
    _check_range(sigma_min, sigma_max)
    _check_positive("rho", rho)
    ramp = torch.linspace(1, 0, n, device=device) ** rho
    sigmas = torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))
    return append_zero(sigmas)


def get_sigmas_vp(
    n: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3, device: Device = "cpu"
) -> Tensor:
    """Continuous VP (Song et al. 2021) schedule."""
    _check_n(n)
    for name, v in (("beta_d", beta_d), ("beta_min", beta_min), ("eps_s", eps_s)):
        _check_positive(name, v)
    if eps_s >= 1:
        raise ValueError(f"eps_s must be < 1, got {eps_s!r}")
    t = torch.linspace(1, eps_s, n, device=device)
    sigmas = torch.sqrt(torch.exp(beta_d * t**2 / 2 + beta_min * t) - 1)
    return append_zero(sigmas)


def get_sigmas_linear(n: int, sigma_min: float, sigma_max: float, device: Device = "cpu") -> Tensor:
    """Schedule uniform in sigma."""
    _check_n(n)
    _check_range(sigma_min, sigma_max)
    return append_zero(torch.linspace(sigma_max, sigma_min, n, device=device))


def get_sigmas_cosine(n: int, sigma_min: float, sigma_max: float, device: Device = "cpu") -> Tensor:
    """Cosine (Nichol & Dhariwal 2021) schedule: uniform in t with sigma = tan(t * pi / 2)."""
    _check_n(n)
    _check_range(sigma_min, sigma_max)
    t_max, t_min = math.atan(sigma_max) * 2 / math.pi, math.atan(sigma_min) * 2 / math.pi
    t = torch.linspace(t_max, t_min, n, device=device, dtype=torch.float64)
    return append_zero(torch.tan(t * math.pi / 2).to(torch.get_default_dtype()))


def get_sigmas_custom(sigmas: Sequence[float] | Tensor, device: Device = "cpu") -> Tensor:
    """A caller's own descending sigmas; a final 0 is appended when missing."""
    s = torch.as_tensor(sigmas, dtype=torch.get_default_dtype()).flatten()
    if s.numel() < 1:
        raise ValueError("sigmas must hold at least one value")
    if not torch.isfinite(s).all() or (s < 0).any():
        raise ValueError(f"sigmas must be finite (as {str(s.dtype).removeprefix('torch.')}) and >= 0")
    if s.numel() > 1 and not (s[1:] < s[:-1]).all():
        raise ValueError("sigmas must be strictly descending")
    if s[-1] != 0:
        s = append_zero(s)
    if s.numel() < 2:
        raise ValueError("sigmas must hold at least one nonzero value")
    return s.to(device)


# Schedule objects: parameters recorded, called with the number of steps.


@dataclass(frozen=True)
class Schedule:
    """Base class: a parametrised schedule, ``schedule(n) -> sigmas`` (length n + 1, ending in 0)."""

    def __call__(self, n: int, device: Device = "cpu") -> Tensor:
        raise NotImplementedError

    @property
    def config(self) -> dict[str, object]:
        return {"type": type(self).__name__, **self.__dict__}


@dataclass(frozen=True)
class KarrasSchedule(Schedule):
    sigma_min: float
    sigma_max: float
    rho: float = 7.0

    def __call__(self, n: int, device: Device = "cpu") -> Tensor:
        return get_sigmas_karras(n, self.sigma_min, self.sigma_max, self.rho, device)


@dataclass(frozen=True)
class ExponentialSchedule(Schedule):
    sigma_min: float
    sigma_max: float

    def __call__(self, n: int, device: Device = "cpu") -> Tensor:
        return get_sigmas_exponential(n, self.sigma_min, self.sigma_max, device)


@dataclass(frozen=True)
class PolyExponentialSchedule(Schedule):
    sigma_min: float
    sigma_max: float
    rho: float = 1.0

    def __call__(self, n: int, device: Device = "cpu") -> Tensor:
        return get_sigmas_polyexponential(n, self.sigma_min, self.sigma_max, self.rho, device)


@dataclass(frozen=True)
class VPSchedule(Schedule):
    beta_d: float = 19.9
    beta_min: float = 0.1
    eps_s: float = 1e-3

    def __call__(self, n: int, device: Device = "cpu") -> Tensor:
        return get_sigmas_vp(n, self.beta_d, self.beta_min, self.eps_s, device)


@dataclass(frozen=True)
class LinearSchedule(Schedule):
    sigma_min: float
    sigma_max: float

    def __call__(self, n: int, device: Device = "cpu") -> Tensor:
        return get_sigmas_linear(n, self.sigma_min, self.sigma_max, device)


@dataclass(frozen=True)
class CosineSchedule(Schedule):
    sigma_min: float
    sigma_max: float

    def __call__(self, n: int, device: Device = "cpu") -> Tensor:
        return get_sigmas_cosine(n, self.sigma_min, self.sigma_max, device)


@dataclass(frozen=True)
class CustomSchedule(Schedule):
    """Fixed sigmas; ``n`` must equal the number of steps they define."""

    sigmas: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        get_sigmas_custom(list(self.sigmas))  # validate early

    def __call__(self, n: int | None = None, device: Device = "cpu") -> Tensor:
        s = get_sigmas_custom(list(self.sigmas), device)
        if n is not None and n != len(s) - 1:
            raise ValueError(f"steps ({n}) does not match the {len(s) - 1} steps of the custom sigmas")
        return s

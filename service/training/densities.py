"""Training noise-level (sigma) densities, each drawing from an explicit generator for exact resumes."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

SigmaSampler = Callable[[int, torch.Generator], Tensor]


def _uniform(n: int, gen: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> Tensor:
    return torch.rand([n], generator=gen, dtype=torch.float64) * (hi - lo) + lo


def rand_log_normal(n: int, gen: torch.Generator, loc: float = -1.2, scale: float = 1.2) -> Tensor:
    """EDM default: log(sigma) ~ N(loc, scale^2)."""
    return (torch.randn([n], generator=gen, dtype=torch.float64) * scale + loc).exp()


def rand_log_logistic(
    n: int,
    gen: torch.Generator,
    loc: float = -0.5,
    scale: float = 1.0,
    min_value: float = 0.0,
    max_value: float = math.inf,
) -> Tensor:
    """log(sigma) ~ Logistic(loc, scale), truncated to [min_value, max_value] by inverse-CDF sampling."""

    def cdf(v: float) -> float:
        if v <= 0:
            return 0.0
        if math.isinf(v):
            return 1.0
        return 1 / (1 + math.exp(-(math.log(v) - loc) / scale))

    u = _uniform(n, gen, cdf(min_value), cdf(max_value)).clamp(1e-12, 1 - 1e-12)
    return (u.logit() * scale + loc).exp()


def rand_log_uniform(
    n: int, gen: torch.Generator, min_value: float = 0.01, max_value: float = 20.0
) -> Tensor:
    """log(sigma) uniform on [log min_value, log max_value]."""
    return _uniform(n, gen, math.log(min_value), math.log(max_value)).exp()


def rand_v_diffusion(
    n: int, gen: torch.Generator, sigma_data: float = 0.5, min_value: float = 0.01, max_value: float = 20.0
) -> Tensor:
    """The cosine schedule's density: t ~ U, sigma = sigma_data * tan(t * pi / 2), truncated."""
    t_lo = math.atan(min_value / sigma_data) * 2 / math.pi
    t_hi = math.atan(max_value / sigma_data) * 2 / math.pi
    return (_uniform(n, gen, t_lo, t_hi) * math.pi / 2).tan() * sigma_data


DENSITIES: dict[str, Callable[..., Tensor]] = {
    "log-normal": rand_log_normal,
    "log-logistic": rand_log_logistic,
    "log-uniform": rand_log_uniform,
    "v-diffusion": rand_v_diffusion,
}


def make_sigma_sampler(name: str, **options: Any) -> SigmaSampler:
    """Bind a density by name with its options; unknown names or options are a ValueError."""
    if name not in DENSITIES:
        raise ValueError(f"unknown sigma density {name!r}; choose one of {sorted(DENSITIES)}")
    fn = DENSITIES[name]
    try:
        fn(1, torch.Generator().manual_seed(0), **options)
    except TypeError as e:
        raise ValueError(f"bad options for sigma density {name!r}: {e}") from e
    return lambda n, gen: fn(n, gen, **options).float()

"""Noise schedules given a sigma range: ``get_sigmas_<name>`` functions and the :class:`Schedule` object.

Every function returns a descending 1-D tensor of ``n`` sigmas followed by a final 0, and registers
itself with ``@schedule`` (its option defaults are its signature's; the bounds are written there).
k-diffusion's (karras, exponential, polyexponential, vp) keep k-diffusion's names and results; the
later ones (beta, kl_optimal, linear_quadratic, align_your_steps, laplace) say in their docstrings
where they come from and where ours differs from a peer's. Schedules over a model's discrete sigma
table are in :mod:`.schedules_discrete`.

A :class:`Schedule` fixes a schedule's options and is called with the step count, so that
``KSampler(model, schedule=Schedule("karras", 0.002, 80.0, rho=7.0))`` works (``KarrasSchedule(...)``
and the other old class names still make one).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.special import betaincinv  # scipy.stats would add ~1 s to every process start
from torch import Tensor

from .catalog import SIGMA_RANGE, Bounds, get_schedule, schedule
from .errors import InputError
from .utils import append_zero

Device = torch.device | str


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError("steps", f"steps must be an integer >= 1, got {n!r}")


def _check_range(sigma_min: float, sigma_max: float) -> None:
    for name, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
        if not math.isfinite(float(v)) or float(v) <= 0:
            raise InputError(name, f"{name} must be a finite number > 0, got {v!r}")
    if float(sigma_min) >= float(sigma_max):
        raise InputError("sigma_min", f"sigma_min ({sigma_min}) must be < sigma_max ({sigma_max})")


def _check_positive(name: str, v: float) -> None:
    if not math.isfinite(float(v)) or float(v) <= 0:
        raise InputError(name, f"{name} must be a finite number > 0, got {v!r}")


@schedule(
    options={**SIGMA_RANGE, "rho": Bounds(lo=0.1, hi=100.0)},
    doc="Karras et al. (2022): uniform in sigma^(1/rho)",
    aliases=("Karras", "use_karras_sigmas"),
)
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


@schedule(options=SIGMA_RANGE, doc="uniform in log sigma", aliases=("Exponential", "use_exponential_sigmas"))
def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float, device: Device = "cpu") -> Tensor:
    """Schedule uniform in log sigma."""
    _check_n(n)
    _check_range(sigma_min, sigma_max)
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, device=device).exp()
    return append_zero(sigmas)


@schedule(
    options={**SIGMA_RANGE, "rho": Bounds(lo=0.1, hi=100.0)},
    doc="polynomial in log sigma (rho=1: exponential)",
    aliases=("Polyexponential",),
)
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


@schedule(
    options={
        "beta_d": Bounds(lo=1e-3, hi=100.0),
        "beta_min": Bounds(lo=1e-4, hi=10.0),
        "eps_s": Bounds(lo=1e-6, hi=0.5),
    },
    uses_range=False,
    doc="continuous VP (Song et al. 2021)",
)
def get_sigmas_vp(
    n: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3, device: Device = "cpu"
) -> Tensor:
    """Continuous VP (Song et al. 2021) schedule."""
    _check_n(n)
    for name, v in (("beta_d", beta_d), ("beta_min", beta_min), ("eps_s", eps_s)):
        _check_positive(name, v)
    if eps_s >= 1:
        raise InputError("eps_s", f"eps_s must be < 1, got {eps_s!r}")
    t = torch.linspace(1, eps_s, n, device=device)
    sigmas = torch.sqrt(torch.exp(beta_d * t**2 / 2 + beta_min * t) - 1)
    return append_zero(sigmas)


@schedule(options=SIGMA_RANGE, doc="uniform in sigma")
def get_sigmas_linear(n: int, sigma_min: float, sigma_max: float, device: Device = "cpu") -> Tensor:
    """Schedule uniform in sigma."""
    _check_n(n)
    _check_range(sigma_min, sigma_max)
    return append_zero(torch.linspace(sigma_max, sigma_min, n, device=device))


@schedule(options=SIGMA_RANGE, doc="cosine: uniform in t, sigma = tan(t pi / 2)")
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


@schedule(
    options={**SIGMA_RANGE, "alpha": Bounds(lo=0.01, hi=100.0), "beta": Bounds(lo=0.01, hi=100.0)},
    doc="Lee et al. (2024): Beta(alpha, beta) quantiles, spread in log sigma",
    aliases=("Beta", "use_beta_sigmas"),
)
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
    ramp = betaincinv(alpha, beta, 1 - np.arange(n) / max(n - 1, 1)) if n > 1 else np.ones(1)
    return _finish(_log_ramp(ramp, sigma_min, sigma_max), device)


@schedule(options=SIGMA_RANGE, doc="Sabour et al. (2024): uniform in arctan(sigma)", aliases=("KL Optimal",))
def get_sigmas_kl_optimal(n: int, sigma_min: float, sigma_max: float, device: Device = "cpu") -> Tensor:
    """KL-optimal schedule (Sabour et al. 2024, AYS appendix): uniform in arctan(sigma)."""
    _check_n(n)
    _check_range(sigma_min, sigma_max)
    t = np.linspace(0, 1, n)
    return _finish(np.tan(t * math.atan(sigma_min) + (1 - t) * math.atan(sigma_max)), device)


@schedule(
    options={
        "sigma_max": SIGMA_RANGE["sigma_max"],
        "threshold_noise": Bounds(lo=1e-4, hi=0.5),
        "linear_steps": Bounds(lo=1, hi=10_000, integer=True),
    },
    doc="Movie Gen / Mochi: linear then quadratic in sigma / sigma_max",
    aliases=("Linear Quadratic",),
)
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
        raise InputError("threshold_noise", f"threshold_noise must be in (0, 1), got {threshold_noise!r}")
    if n == 1:
        return _finish(np.array([sigma_max]), device)
    lin = n // 2 if linear_steps is None else int(linear_steps)
    if not 1 <= lin < n:
        raise InputError(
            "linear_steps", f"linear_steps must be in [1, {n - 1}] for {n} steps, got {linear_steps!r}"
        )
    i = np.arange(n, dtype=np.float64)
    slope, q = threshold_noise / lin, n - lin
    if slope * q >= 2 * (1 - threshold_noise):  # the quadratic would turn back before step n
        raise InputError(
            "threshold_noise",
            f"threshold_noise={threshold_noise} with linear_steps={lin} of {n} steps does not descend; "
            "use a smaller threshold_noise or more linear_steps",
        )
    a = (1 - threshold_noise - slope * q) / q**2
    u = np.where(i < lin, i * slope, threshold_noise + slope * (i - lin) + a * (i - lin) ** 2)
    return _finish(sigma_max * (1 - u), device)


def loglinear_interp(values: tuple[float, ...] | list[float], n: int) -> np.ndarray:
    """Resample a descending list to n points, linearly in log value over a uniform index."""
    ys = np.log(np.asarray(values, dtype=np.float64)[::-1])
    xs = np.linspace(0, 1, len(ys))
    return np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1].copy()


@schedule(
    options={"model": Bounds(choices=tuple(AYS_TABLES))},
    uses_range=False,
    doc="Sabour et al. (2024): NVIDIA's tables (sd15, sdxl, svd), log-linear interpolation",
    aliases=("Align Your Steps", "AYS", "ays"),
)
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
        raise InputError(
            "model", f"model must be one of {sorted(AYS_TABLES)}, got {model!r}", sorted(AYS_TABLES)
        )
    table = AYS_TABLES[model]
    pts = np.asarray(table) if n + 1 == len(table) else loglinear_interp(table, n + 1)
    return _finish(pts[:-1], device)


def _laplace_cdf(x: float, mu: float, b: float) -> float:
    """The Laplace(mu, b) distribution function."""
    z = (x - mu) / b
    return 0.5 * math.exp(z) if z < 0 else 1 - 0.5 * math.exp(-z)


def _laplace_ppf(p: np.ndarray, mu: float, b: float) -> np.ndarray:
    """Its inverse: mu - b sign(p - 1/2) log(1 - 2|p - 1/2|) (+-inf at p = 0 or 1; the caller clips)."""
    with np.errstate(divide="ignore"):
        return mu - b * np.sign(p - 0.5) * np.log1p(-2 * np.abs(p - 0.5))


@schedule(
    options={**SIGMA_RANGE, "mu": Bounds(lo=-10.0, hi=10.0), "beta": Bounds(lo=0.01, hi=10.0)},
    doc="Hang et al. (2024): Laplace(mu, beta) quantiles of log sigma",
    aliases=("Laplace",),
)
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
        raise InputError("mu", f"mu must be finite, got {mu!r}")
    p_hi, p_lo = _laplace_cdf(math.log(sigma_max), mu, beta), _laplace_cdf(math.log(sigma_min), mu, beta)
    p = np.linspace(p_hi, p_lo, n)
    log_sigma = np.clip(_laplace_ppf(p, mu, beta), math.log(sigma_min), math.log(sigma_max))
    log_sigma[0], log_sigma[-1] = math.log(sigma_max), math.log(sigma_min) if n > 1 else math.log(sigma_max)
    return _finish(np.exp(log_sigma), device)


class Schedule:
    """A registered schedule with its options fixed, called with the step count.

    ``Schedule("karras", 0.03, 14.6, rho=5.0)(n)`` is ``get_sigmas_karras(n, 0.03, 14.6, rho=5.0)``:
    arguments bind to the schedule function's parameters after ``n`` (sigma_min, sigma_max for the
    ones that use a range, then its options), and are checked by the function when it is called.
    """

    def __init__(self, name: str, *args: Any, **options: Any) -> None:
        info = get_schedule(name)
        if info.needs_discrete:
            raise ValueError(f"schedule {name!r} needs a model's sigma table; give its name to KSampler")
        params = [
            p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD)
            for p in inspect.signature(info.function).parameters.values()
            if p.name not in ("n", "device") and (info.uses_range or p.name not in ("sigma_min", "sigma_max"))
        ]
        bound = inspect.Signature(params).bind(*args, **options)
        self.name = name
        self.options: dict[str, Any] = dict(bound.arguments)

    def __call__(self, n: int, device: Device = "cpu") -> Tensor:
        info = get_schedule(self.name)
        opts = dict(self.options)
        return info.fn(n, opts.pop("sigma_min", None), opts.pop("sigma_max", None), device=device, **opts)

    @property
    def config(self) -> dict[str, object]:
        return {"type": self.name, **self.options}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and (self.name, self.options) == (other.name, other.options)

    def __hash__(self) -> int:
        return hash((self.name, tuple(self.options.items())))

    def __repr__(self) -> str:
        given = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"Schedule({self.name!r}{', ' if given else ''}{given})"


class CustomSchedule(Schedule):
    """Fixed sigmas (validated at once); ``n``, when given, must equal the number of steps they define."""

    def __init__(self, sigmas: Sequence[float] = ()) -> None:
        get_sigmas_custom(list(sigmas))  # validate early
        self.name = "custom"
        self.sigmas = tuple(sigmas)
        self.options = {"sigmas": self.sigmas}

    def __call__(self, n: int | None = None, device: Device = "cpu") -> Tensor:
        s = get_sigmas_custom(list(self.sigmas), device)
        if n is not None and n != len(s) - 1:
            raise ValueError(f"steps ({n}) does not match the {len(s) - 1} steps of the custom sigmas")
        return s


# The names schedule objects had when each was its own class: ``KarrasSchedule(0.03, 14.6, rho=7.0)``.
KarrasSchedule = functools.partial(Schedule, "karras")
ExponentialSchedule = functools.partial(Schedule, "exponential")
PolyExponentialSchedule = functools.partial(Schedule, "polyexponential")
VPSchedule = functools.partial(Schedule, "vp")
LinearSchedule = functools.partial(Schedule, "linear")
CosineSchedule = functools.partial(Schedule, "cosine")
BetaSchedule = functools.partial(Schedule, "beta")
KLOptimalSchedule = functools.partial(Schedule, "kl_optimal")
AlignYourStepsSchedule = functools.partial(Schedule, "align_your_steps")

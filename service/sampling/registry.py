"""Name -> sampler / schedule, with the metadata the API, KSampler and the engine need.

Option defaults come from the stepper signatures (k-diffusion's), bounds are ours: they are what
the HTTP API validates against and lists under GET /samplers and /schedules.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import dpm_solver, samplers, schedules
from .stepper import Stepper

INF = math.inf


class UnknownNameError(ValueError):
    """An unknown sampler or schedule name; the message lists the valid ones."""

    def __init__(self, kind: str, name: str, valid: list[str]) -> None:
        super().__init__(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(valid)}")
        self.kind, self.name, self.valid = kind, name, valid


@dataclass(frozen=True)
class Option:
    """One sampler or schedule option: default, numeric bounds (inclusive) or allowed choices."""

    default: Any
    lo: float = -INF
    hi: float = INF
    choices: tuple[Any, ...] | None = None
    integer: bool = False

    def check(self, name: str, value: Any) -> Any:
        if self.choices is not None:
            if value not in self.choices:
                raise ValueError(f"{name} must be one of {list(self.choices)}, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if self.integer and value != int(value):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if math.isnan(value) or not self.lo <= value <= self.hi:
            raise ValueError(f"{name} must be in [{self.lo}, {self.hi}], got {value!r}")
        return int(value) if self.integer else float(value)

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"default": None if self.default == INF else self.default}
        if self.choices is not None:
            d["choices"] = list(self.choices)
        else:
            d["type"] = "integer" if self.integer else "number"
            d["minimum"] = None if self.lo == -INF else self.lo
            d["maximum"] = None if self.hi == INF else self.hi
        return d


def check_options(
    kind: str, name: str, spec: Mapping[str, Option], given: Mapping[str, Any]
) -> dict[str, Any]:
    """Validate ``given`` against ``spec``; unknown keys name the allowed ones."""
    out = {}
    for key, value in given.items():
        if key not in spec:
            allowed = ", ".join(spec) or "none"
            raise ValueError(f"unknown option {key!r} for {kind} {name!r}; allowed options: {allowed}")
        out[key] = spec[key].check(key, value)
    return out


@dataclass(frozen=True)
class SamplerInfo:
    name: str
    stepper: Callable[..., Stepper]
    order: int
    nfe_per_step: int
    stochastic: bool
    noise: str = "none"  # "none" | "gaussian" | "brownian"
    batch_coupled: bool = False
    needs_uncond: bool = False
    bounds: Mapping[str, Option] = field(default_factory=dict)
    origin: str = "k-diffusion"
    nfe: Callable[[int, Mapping[str, Any]], int] | None = None  # total model calls, when not the rule below

    def expected_nfe(self, steps: int, options: Mapping[str, Any] | None = None) -> int:
        """Model calls for ``steps`` steps (a last step to sigma = 0 that is first order saves nfe - 1)."""
        if self.nfe is not None:
            return self.nfe(steps, {**self.options, **(options or {})})
        return max(1, steps * self.nfe_per_step - (self.nfe_per_step - 1))

    @property
    def options(self) -> dict[str, Any]:
        return {k: o.default for k, o in self.bounds.items()}

    @property
    def doc(self) -> str:
        return (self.stepper.__doc__ or "").strip().splitlines()[0]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "doc": self.doc,
            "order": self.order,
            "nfe_per_step": self.nfe_per_step,
            "stochastic": self.stochastic,
            "noise": self.noise,
            "needs_uncond": self.needs_uncond,
            "origin": self.origin,
            "options": {k: o.describe() for k, o in self.bounds.items()},
        }


@dataclass(frozen=True)
class ScheduleInfo:
    name: str
    fn: Callable[..., Tensor]  # fn(n, sigma_min, sigma_max, device=..., **options)
    bounds: Mapping[str, Option] = field(default_factory=dict)
    needs_discrete: bool = False
    uses_range: bool = True
    doc: str = ""

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "doc": self.doc,
            "needs_discrete": self.needs_discrete,
            "uses_sigma_range": self.uses_range,
            "options": {k: o.describe() for k, o in self.bounds.items()},
        }


# Bounds shared by many samplers.
_ETA = Option(1.0, 0.0, 10.0)
_S_NOISE = Option(1.0, 0.0, 10.0)
_CHURN = {
    "s_churn": Option(0.0, 0.0, 1000.0),
    "s_tmin": Option(0.0, 0.0, INF),
    "s_tmax": Option(INF, 0.0, INF),
    "s_noise": _S_NOISE,
}
_ANCESTRAL = {"eta": _ETA, "s_noise": _S_NOISE}


def _from_sigmas(fn: Callable[..., Stepper], with_n: bool) -> Callable[..., Stepper]:
    """Adapt dpm_fast/dpm_adaptive (sigma_min, sigma_max[, n]) to the common (x, sigmas) stepper shape."""

    def stepper(x: Tensor, sigmas: Tensor, **kw: Any) -> Stepper:
        positive = sigmas[sigmas > 0]
        if positive.numel() < 1:
            raise ValueError("the schedule needs at least one sigma > 0")
        sigma_min, sigma_max = float(positive.min()), float(sigmas.max())
        if sigma_min >= sigma_max:  # one step: it would run from sigma_max to itself and return noise
            raise ValueError(
                f"{fn.__name__} needs steps >= 2 (it runs between the schedule's first and last sigma > 0)"
            )
        if with_n:
            return fn(x, sigma_min, sigma_max, len(sigmas) - 1, **kw)
        return fn(x, sigma_min, sigma_max, **kw)

    stepper.__name__, stepper.__doc__ = fn.__name__, fn.__doc__
    return stepper


SAMPLERS: dict[str, SamplerInfo] = {}
SCHEDULES: dict[str, ScheduleInfo] = {}


def register_sampler(info: SamplerInfo) -> SamplerInfo:
    params = inspect.signature(info.stepper).parameters
    open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    missing = [k for k in info.bounds if k not in params]
    if missing and not open_kwargs:
        raise TypeError(f"sampler {info.name}: bounds for unknown options {missing}")
    SAMPLERS[info.name] = info
    return info


def register_schedule(info: ScheduleInfo) -> ScheduleInfo:
    SCHEDULES[info.name] = info
    return info


for _info in [
    SamplerInfo("euler", samplers.euler, 1, 1, False, "gaussian", bounds=_CHURN),
    SamplerInfo("euler_ancestral", samplers.euler_ancestral, 1, 1, True, "gaussian", bounds=_ANCESTRAL),
    SamplerInfo("heun", samplers.heun, 2, 2, False, "gaussian", bounds=_CHURN),
    SamplerInfo("dpm_2", samplers.dpm_2, 2, 2, False, "gaussian", bounds=_CHURN),
    SamplerInfo("dpm_2_ancestral", samplers.dpm_2_ancestral, 2, 2, True, "gaussian", bounds=_ANCESTRAL),
    SamplerInfo("lms", samplers.lms, 4, 1, False, bounds={"order": Option(4, 1, 8, integer=True)}),
    SamplerInfo(
        "dpm_fast",
        _from_sigmas(dpm_solver.dpm_fast, True),
        3,
        1,
        False,
        "gaussian",
        bounds={"eta": Option(0.0, 0.0, 10.0), "s_noise": _S_NOISE},
    ),
    SamplerInfo(
        "dpm_adaptive",
        _from_sigmas(dpm_solver.dpm_adaptive, False),
        3,
        3,
        False,
        "gaussian",
        batch_coupled=True,
        bounds={
            "order": Option(3, choices=(2, 3)),
            "rtol": Option(0.05, 1e-6, 10.0),
            "atol": Option(0.0078, 1e-6, 10.0),
            "h_init": Option(0.05, 1e-4, 10.0),
            # PID gains: outside this box the step size controller can diverge (measured on the
            # digits model: icoeff -1, dcoeff -1 or pcoeff -1 give NaN), inside it every corner ran.
            "pcoeff": Option(0.0, 0.0, 1.0),
            "icoeff": Option(1.0, 0.05, 2.0),
            "dcoeff": Option(0.0, 0.0, 1.0),
            "accept_safety": Option(0.81, 0.0, 1.0),
            "eta": Option(0.0, 0.0, 10.0),
            "s_noise": _S_NOISE,
        },
    ),
    SamplerInfo("dpmpp_2s_ancestral", samplers.dpmpp_2s_ancestral, 2, 2, True, "gaussian", bounds=_ANCESTRAL),
    SamplerInfo(
        "dpmpp_sde",
        samplers.dpmpp_sde,
        2,
        2,
        True,
        "brownian",
        bounds={**_ANCESTRAL, "r": Option(0.5, 0.01, 1.0)},
    ),
    SamplerInfo("dpmpp_2m", samplers.dpmpp_2m, 2, 1, False),
    SamplerInfo(
        "dpmpp_2m_sde",
        samplers.dpmpp_2m_sde,
        2,
        1,
        True,
        "brownian",
        bounds={**_ANCESTRAL, "solver_type": Option("midpoint", choices=("midpoint", "heun"))},
    ),
    SamplerInfo("dpmpp_3m_sde", samplers.dpmpp_3m_sde, 3, 1, True, "brownian", bounds=_ANCESTRAL),
]:
    register_sampler(_info)

_RANGE = {"sigma_min": Option(None, 1e-5, 1e4), "sigma_max": Option(None, 1e-4, 1e5)}
for _sched in [
    ScheduleInfo(
        "karras",
        schedules.get_sigmas_karras,
        {**_RANGE, "rho": Option(7.0, 0.1, 100.0)},
        doc="Karras et al. (2022): uniform in sigma^(1/rho)",
    ),
    ScheduleInfo("exponential", schedules.get_sigmas_exponential, _RANGE, doc="uniform in log sigma"),
    ScheduleInfo(
        "polyexponential",
        schedules.get_sigmas_polyexponential,
        {**_RANGE, "rho": Option(1.0, 0.1, 100.0)},
        doc="polynomial in log sigma (rho=1: exponential)",
    ),
    ScheduleInfo(
        "vp",
        lambda n, sigma_min, sigma_max, device="cpu", **kw: schedules.get_sigmas_vp(n, device=device, **kw),
        {
            "beta_d": Option(19.9, 1e-3, 100.0),
            "beta_min": Option(0.1, 1e-4, 10.0),
            "eps_s": Option(1e-3, 1e-6, 0.5),
        },
        uses_range=False,
        doc="continuous VP (Song et al. 2021)",
    ),
    ScheduleInfo("linear", schedules.get_sigmas_linear, _RANGE, doc="uniform in sigma"),
    ScheduleInfo(
        "cosine", schedules.get_sigmas_cosine, _RANGE, doc="cosine: uniform in t, sigma = tan(t pi / 2)"
    ),
]:
    register_schedule(_sched)


def _names(table: Mapping[str, Any]) -> list[str]:
    return sorted(table)


def get_sampler(name: str) -> SamplerInfo:
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise UnknownNameError("sampler", str(name), _names(SAMPLERS)) from None


def get_schedule(name: str) -> ScheduleInfo:
    try:
        return SCHEDULES[name]
    except (KeyError, TypeError):
        raise UnknownNameError("schedule", str(name), _names(SCHEDULES)) from None


def schedule_sigmas(
    name: str, n: int, sigma_min: float, sigma_max: float, device: torch.device | str = "cpu", **options: Any
) -> Tensor:
    """Sigmas (n + 1, ending in 0) for a registered schedule, options validated."""
    info = get_schedule(name)
    opts = check_options("schedule", name, info.bounds, options)
    sigma_min = opts.pop("sigma_min", sigma_min)
    sigma_max = opts.pop("sigma_max", sigma_max)
    return info.fn(n, sigma_min, sigma_max, device=device, **opts)


from . import registry_extra  # noqa: E402,F401  (registers the samplers and schedules beyond k-diffusion's)

# Schedules over a model's discrete sigma table (Stable Diffusion and other DDPM-trained models).
from . import schedules_discrete as _discrete  # noqa: E402

for _name, (_fn, _doc) in _discrete.DISCRETE_SCHEDULES.items():
    register_schedule(ScheduleInfo(_name, _fn, {}, needs_discrete=True, uses_range=False, doc=_doc))

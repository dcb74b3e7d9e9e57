"""The sampler and schedule tables and the decorators that fill them, where each one is defined.

A sampler module writes its stepper and puts its metadata on it::

    @sampler(order=2, noise="gaussian", options=ANCESTRAL, aliases=("DPM2 a",), origin="k-diffusion")
    def dpm_2_ancestral(x, sigmas, io, *, eta=1.0, s_noise=1.0): ...

Option defaults are read from the stepper's signature; only the bounds are written here (they are
what the HTTP API validates against and lists under GET /samplers and /schedules). Schedules do the
same with :func:`schedule`. This module imports no sampler: the registry imports the sampler and
schedule modules, which import this one.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict, TypeVar, Unpack

from torch import Tensor

from .errors import InputError
from .k_api import k_sampler
from .samplers.flow_forms import flow_info
from .stepper import StepIO, Stepper

INF = math.inf
NOISE_KINDS = ("none", "gaussian", "brownian")
# What a registered stepper takes besides options: x, sigmas and (keywords) the StepIO fields.
PLUMBING = ("io", *StepIO._fields)

# Options whose value here turns a noise-drawing sampler into an ODE solver (its deterministic mode).
DETERMINISTIC_MODES = (("eta", 0.0), ("gamma", 0.0), ("restart_times", 0))

# The traits GET /samplers shows for each sampler (besides name, doc and options).
DESCRIBED_TRAITS = ("order", "nfe_per_step", "stochastic", "noise", "needs_uncond", "origin")

F = TypeVar("F", bound=Callable[..., Any])
NfeRule = Callable[[int, Mapping[str, Any]], int]


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
                raise InputError(
                    name, f"{name} must be one of {list(self.choices)}, got {value!r}", list(self.choices)
                )
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InputError(name, f"{name} must be a number, got {value!r}")
        if self.integer and value != int(value):
            raise InputError(name, f"{name} must be an integer, got {value!r}")
        if math.isnan(value) or not self.lo <= value <= self.hi:
            raise InputError(name, f"{name} must be in [{self.lo}, {self.hi}], got {value!r}")
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


@dataclass(frozen=True, kw_only=True)
class Bounds:
    """What is written by hand for an option: its range (inclusive), or its choices. The default is
    the stepper's (or schedule function's) own, read from its signature."""

    lo: float = -INF
    hi: float = INF
    integer: bool = False
    choices: tuple[Any, ...] | None = None

    def with_default(self, default: Any) -> Option:
        return Option(default, self.lo, self.hi, self.choices, self.integer)


# Bounds shared by many samplers and schedules.
ETA = Bounds(lo=0.0, hi=10.0)
S_NOISE = Bounds(lo=0.0, hi=10.0)
CHURN = {
    "s_churn": Bounds(lo=0.0, hi=1000.0),
    "s_tmin": Bounds(lo=0.0, hi=INF),
    "s_tmax": Bounds(lo=0.0, hi=INF),
    "s_noise": S_NOISE,
}
ANCESTRAL = {"eta": ETA, "s_noise": S_NOISE}
# A sampler keyword with one of these names gets these bounds unless its decorator (or its family)
# gives others: the one place the usual noise options are bounded.
STANDARD_OPTIONS = {**CHURN, **ANCESTRAL}
SIGMA_RANGE = {"sigma_min": Bounds(lo=1e-5, hi=1e4), "sigma_max": Bounds(lo=1e-4, hi=1e5)}


def check_options(
    kind: str, name: str, spec: Mapping[str, Option], given: Mapping[str, Any]
) -> dict[str, Any]:
    """Validate ``given`` against ``spec``; unknown keys name the allowed ones."""
    out = {}
    for key, value in given.items():
        if key not in spec:
            allowed = ", ".join(spec) or "none"
            raise InputError(
                key, f"unknown option {key!r} for {kind} {name!r}; allowed options: {allowed}", list(spec)
            )
        out[key] = spec[key].check(key, value)
    return out


@dataclass(frozen=True, kw_only=True)
class Entry:
    """A registered sampler or schedule: its name and option bounds (defaults from its signature)."""

    name: str
    bounds: Mapping[str, Option] = field(default_factory=dict)

    @property
    def options(self) -> dict[str, Any]:
        return {k: o.default for k, o in self.bounds.items()}

    def described(self, doc: str, **traits: Any) -> dict[str, Any]:
        """The catalogue entry: name, doc, the traits given, and each option's bounds."""
        return {
            "name": self.name,
            "doc": doc,
            **traits,
            "options": {k: o.describe() for k, o in self.bounds.items()},
        }


@dataclass(frozen=True, kw_only=True)
class SamplerInfo(Entry):
    stepper: Callable[..., Stepper]  # stepper(x, sigmas, *, callback=None, noise_sampler=None, **options)
    sample: Callable[..., Any]  # the k-diffusion style sample_<name>
    order: int
    nfe_per_step: int = 1
    stochastic: bool = False
    noise: str = "none"  # "none" | "gaussian" | "brownian"
    batch_coupled: bool = False
    adaptive: bool = False  # its evaluation count is not known ahead (progress follows its sigma)
    sigma_range: bool = False  # it uses only the schedule's first and last sigma > 0 (dpm_fast, dpm_adaptive)
    needs_uncond: bool = False
    origin: str = "k-diffusion"
    aliases: tuple[str, ...] = ()
    nfe: NfeRule | None = None  # total model calls, when not the rule below

    def expected_nfe(self, steps: int, options: Mapping[str, Any] | None = None) -> int:
        """Model calls for ``steps`` steps (a last step to sigma = 0 that is first order saves nfe - 1)."""
        if self.nfe is not None:
            return self.nfe(steps, {**self.options, **(options or {})})
        return max(1, steps * self.nfe_per_step - (self.nfe_per_step - 1))

    @property
    def doc(self) -> str:
        return (self.stepper.__doc__ or "").strip().splitlines()[0]

    def describe(self) -> dict[str, Any]:
        return self.described(self.doc, **{k: getattr(self, k) for k in DESCRIBED_TRAITS})


@dataclass(frozen=True, kw_only=True)
class ScheduleInfo(Entry):
    fn: Callable[
        ..., Tensor
    ]  # fn(n, sigma_min, sigma_max, device=..., **options); discrete: fn(n, model, device=...)
    function: Callable[..., Tensor]  # the get_sigmas_<name> it was registered from
    needs_discrete: bool = False
    uses_range: bool = True
    doc: str = ""
    aliases: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        return self.described(self.doc, needs_discrete=self.needs_discrete, uses_sigma_range=self.uses_range)


SAMPLERS: dict[str, SamplerInfo] = {}
SCHEDULES: dict[str, ScheduleInfo] = {}


def get_sampler(name: str) -> SamplerInfo:
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise UnknownNameError("sampler", str(name), sorted(SAMPLERS)) from None


def get_schedule(name: str) -> ScheduleInfo:
    try:
        return SCHEDULES[name]
    except (KeyError, TypeError):
        raise UnknownNameError("schedule", str(name), sorted(SCHEDULES)) from None


def option_specs(
    what: str, fn: Callable[..., Any], bounds: Mapping[str, Bounds], skip: tuple[str, ...]
) -> dict[str, Option]:
    """Options with their defaults from ``fn``'s signature (no default: None, "the caller's").

    Every parameter of ``fn`` that is an option (keyword-only for steppers, after ``n`` for
    schedules) must have bounds unless it is in ``skip``; bounds for a parameter ``fn`` does not
    have are an error too.
    """
    params = inspect.signature(fn).parameters
    unknown = [k for k in bounds if k not in params]
    if unknown:
        raise TypeError(f"{what}: bounds for unknown options {unknown}")
    unbounded = [k for k in params if k not in bounds and k not in skip]
    if unbounded:
        raise TypeError(f"{what}: options {unbounded} have no bounds (give them, or list them as internal)")
    out = {}
    for key, b in bounds.items():
        default = params[key].default
        out[key] = b.with_default(None if default is inspect.Parameter.empty else default)
    return out


def _over_sigma_range(fn: Callable[..., Stepper]) -> Callable[..., Stepper]:
    """Adapt a stepper over (sigma_min, sigma_max[, n]) (dpm_fast, dpm_adaptive) to (x, sigmas)."""
    with_n = "n" in inspect.signature(fn).parameters

    @functools.wraps(fn)
    def stepper(x: Tensor, sigmas: Tensor, **kw: Any) -> Stepper:
        positive = sigmas[sigmas > 0]
        if positive.numel() < 1:
            raise ValueError("the schedule needs at least one sigma > 0")
        sigma_min, sigma_max = float(positive.min()), float(sigmas.max())
        if sigma_min >= sigma_max:  # one step: it would run from sigma_max to itself and return noise
            raise InputError(
                "steps",
                f"{fn.__name__} needs steps >= 2 (it runs between the schedule's first and last sigma > 0)",
            )
        if with_n:
            return fn(x, sigma_min, sigma_max, len(sigmas) - 1, **kw)
        return fn(x, sigma_min, sigma_max, **kw)

    return stepper


def _keyword_io(fn: Callable[..., Stepper]) -> Callable[..., Stepper]:
    """The registered stepper ``name(x, sigmas, *, callback=None, noise_sampler=None, **options)`` of a
    sampler written as ``name(x, sigmas, io, *, **options)`` (its signature: those keywords + options)."""

    def stepper(
        x: Tensor, sigmas: Tensor, *, callback: Any = None, noise_sampler: Any = None, **kw: Any
    ) -> Stepper:
        return fn(x, sigmas, io=StepIO(callback, noise_sampler), **kw)

    kw_only = inspect.Parameter.KEYWORD_ONLY
    head = [
        inspect.Parameter("x", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("sigmas", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        *(inspect.Parameter(name, kw_only, default=None) for name in StepIO._fields),
    ]
    options = [p for p in inspect.signature(fn).parameters.values() if p.kind is kw_only]
    stepper.__signature__ = inspect.Signature([*head, *options])  # type: ignore[attr-defined]
    stepper.__name__ = stepper.__qualname__ = fn.__name__
    stepper.__doc__ = fn.__doc__
    return stepper


def _with_fixed(
    fn: Callable[..., Stepper], name: str, doc: str, fixed: Mapping[str, Any]
) -> Callable[..., Stepper]:
    """``fn`` with some keyword arguments fixed, as its own stepper ``name`` (signature without them)."""

    @functools.wraps(fn)
    def stepper(x: Tensor, sigmas: Tensor, **kw: Any) -> Stepper:
        return fn(x, sigmas, **kw, **fixed)

    sig = inspect.signature(fn)
    stepper.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[p for p in sig.parameters.values() if p.name not in fixed]
    )
    stepper.__name__ = stepper.__qualname__ = name
    stepper.__doc__ = doc
    return stepper


class SamplerTraits(TypedDict, total=False):
    """What :func:`sampler` records of a stepper as it is, into its :class:`SamplerInfo` (same names)."""

    order: int  # required (a variant inherits it)
    origin: str  # required (a variant inherits it)
    nfe_per_step: int
    nfe: NfeRule | None
    noise: str
    stochastic: bool
    batch_coupled: bool
    adaptive: bool
    needs_uncond: bool
    aliases: tuple[str, ...]


FAMILY = "sampler_family"


def family(
    stepper: F,
    *,
    options: Mapping[str, Bounds] | None = None,
    noise: str = "none",
    stochastic: bool = False,
    needs_uncond: bool = False,
) -> F:
    """Mark a family's stepper (made by a factory that writes the signature once) with the option bounds
    and traits every member shares; each member's :func:`sampler` adds its own and may override them."""
    stepper.__dict__[FAMILY] = {
        "options": options or {},
        "noise": noise,
        "stochastic": stochastic,
        "needs_uncond": needs_uncond,
    }
    return stepper


def _inherited(base: SamplerInfo, fixed: Mapping[str, Any]) -> dict[str, Any]:
    """A variant's starting traits and option bounds: its base sampler's, less the fixed arguments."""
    bounds = {
        k: Bounds(lo=o.lo, hi=o.hi, integer=o.integer, choices=o.choices)
        for k, o in base.bounds.items()
        if k not in fixed
    }
    traits = {k: getattr(base, k) for k in SamplerTraits.__annotations__ if k != "aliases"}
    if any(k in fixed and fixed[k] == v for k, v in DETERMINISTIC_MODES):  # fixed in its ODE mode
        traits |= {"noise": "none", "stochastic": False}
    return {"options": bounds, **traits}


def sampler(
    *,
    options: Mapping[str, Bounds] | None = None,
    internal: tuple[str, ...] = (),
    sigma_range: bool = False,
    sample: Callable[..., Any] | None = None,
    name: str | None = None,
    fixed: Mapping[str, Any] | None = None,
    doc: str | None = None,
    **traits: Unpack[SamplerTraits],
) -> Callable[[F], F]:
    """Register the decorated sampler function ``name(x, sigmas, io, *, **options)`` (``io``: a StepIO).

    Its registered stepper is ``name(x, sigmas, *, callback=None, noise_sampler=None, **options)``.

    - ``order``: order of accuracy of the ODE solve; ``nfe_per_step``: model calls per step (``nfe``:
      a rule ``nfe(steps, options) -> calls`` where the count is not ``steps * nfe_per_step`` less
      the saved calls of a first-order last step).
    - ``noise``: what noise sampler a driver hands it ("none", "gaussian" per image, "brownian"
      per image path); ``stochastic``: whether it draws noise with its default options.
    - ``batch_coupled``: images in one call influence each other (adaptive step size), so drivers
      run one stepper per image; ``adaptive``: its model-call count is not known ahead (a driver
      reports its progress from the sigma it has reached); ``needs_uncond``: send it
      :class:`~.stepper.Guided` (CFG++).
    - ``options``: bounds per option (defaults come from the signature; a stepper marked with
      :func:`family` brings its family's bounds and traits); ``internal``: keyword
      arguments for Python callers that are not API options.
    - ``sigma_range``: the stepper takes (x, sigma_min, sigma_max[, n]) instead of sigmas;
      ``sample``: its own k-diffusion function (else one is made from the stepper).
    - ``aliases``: A1111 / ComfyUI / diffusers spellings; ``origin``: the paper or project.
    - ``name``, ``fixed``, ``doc``: register a variant of the decorated stepper under another name,
      with the keyword arguments in ``fixed`` set (stack one decorator per name on the stepper, above
      the base's own): it has the base's traits and option bounds (less ``fixed``) but its aliases,
      unless the decorator gives them; fixed in a deterministic mode (eta = 0, ...) it draws no noise.
    """

    def register(fn: F) -> F:
        if fixed and fn.__name__ in SAMPLERS:  # a variant starts from what its base sampler has
            shared = _inherited(SAMPLERS[fn.__name__], fixed)
        else:  # what the stepper's family gives all its members
            shared = dict(fn.__dict__.get(FAMILY, {}))
        bounds = options if options is not None else shared.pop("options", {})
        shared.pop("options", None)
        given = {**shared, **traits}
        missing = [k for k in ("order", "origin") if k not in given]
        if missing:
            raise TypeError(f"sampler {name or fn.__name__}: give {missing}")
        noise = given.get("noise", "none")
        if noise not in NOISE_KINDS:
            raise ValueError(f"noise must be one of {NOISE_KINDS}, got {noise!r}")
        key = name or fn.__name__
        if key in SAMPLERS:
            raise ValueError(f"sampler {key!r} is registered twice")
        if fixed and not doc:
            raise TypeError(f"sampler {key}: a variant with fixed arguments needs its own doc")
        base = _with_fixed(fn, key, doc or "", fixed) if fixed else fn
        stepper = _keyword_io(_over_sigma_range(base) if sigma_range else base)
        if sample is None and sigma_range:
            raise TypeError(f"sampler {key}: a sigma-range stepper needs its own sample function")
        skip = ("x", "sigmas", "sigma_min", "sigma_max", "n", *PLUMBING, *internal)
        bounds = {**_standard_bounds(base, skip), **bounds}
        SAMPLERS[key] = SamplerInfo(
            name=key,
            stepper=stepper,
            sample=sample or k_sampler(stepper, key, functools.partial(_flow_form, key)),
            bounds=option_specs(f"sampler {key}", base, bounds, skip),
            sigma_range=sigma_range,
            **given,
        )
        return fn

    return register


def _standard_bounds(fn: Callable[..., Any], skip: tuple[str, ...]) -> dict[str, Bounds]:
    """The :data:`STANDARD_OPTIONS` bounds of ``fn``'s options that have one of those names."""
    params = inspect.signature(fn).parameters
    return {k: b for k, b in STANDARD_OPTIONS.items() if k in params and k not in skip}


def _flow_form(key: str, options: dict[str, Any]) -> Callable[..., Stepper]:
    """What sample_<key> runs on a flow-matching model with these options (samplers/flow_forms.py)."""
    return flow_info(SAMPLERS[key], options).stepper


def _without_range(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Call a schedule that ignores the model's sigma range as fn(n, sigma_min, sigma_max, ...)."""

    @functools.wraps(fn)
    def call(n: int, sigma_min: Any = None, sigma_max: Any = None, **kw: Any) -> Tensor:
        return fn(n, **kw)

    return call


def schedule(
    *,
    doc: str,
    options: Mapping[str, Bounds] | None = None,
    uses_range: bool = True,
    discrete: bool = False,
    aliases: tuple[str, ...] = (),
    name: str | None = None,
) -> Callable[[F], F]:
    """Register the decorated ``get_sigmas_<name>(n, sigma_min, sigma_max, ..., device="cpu")``.

    ``uses_range=False``: it ignores the model's sigma range (give it no sigma_min / sigma_max
    bounds); ``discrete``: it is ``get_sigmas_<name>(n, model, device=...)`` over the model's
    discrete sigma table. ``options``: bounds per option (defaults come from the signature).
    """

    def register(fn: F) -> F:
        key = name or fn.__name__.removeprefix("get_sigmas_")
        if key in SCHEDULES:
            raise ValueError(f"schedule {key!r} is registered twice")
        skip = ("n", "model", "device") if discrete else ("n", "device", "sigma_min", "sigma_max")
        SCHEDULES[key] = ScheduleInfo(
            name=key,
            fn=fn if discrete or uses_range else _without_range(fn),
            function=fn,
            bounds=option_specs(f"schedule {key}", fn, options or {}, skip),
            needs_discrete=discrete,
            uses_range=uses_range and not discrete,
            doc=doc,
            aliases=aliases,
        )
        return fn

    return register

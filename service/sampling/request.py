"""What a caller asks for, by name, as plain values -> a validated :class:`SamplingSpec`.

Names are resolved (A1111/ComfyUI/diffusers spellings too), options checked against the registry,
seeds and steps settled, your own sigmas taken as a schedule. Shared by the HTTP API and ``kdiff
sample``; errors are :class:`InputError` naming the request field; no tensors are built here (the
model's own inputs and the driver come after, in the caller).

``req`` is any object with the request's attributes (the API's SampleRequest, a namespace from the
command line); a missing attribute reads as not given.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import aliases, registry
from .errors import InputError
from .schedules import CustomSchedule
from .spec import MAX_STEPS, SamplingSpec

CUSTOM = "custom"  # the schedule name of a request that brings its own sigmas
# The schedules a request may name besides the registry's (GET /schedules lists them all): custom,
# and the model's tuned sigmas (models/tuned.py's TUNED, swapped for sigmas before a spec is built).
REQUEST_SCHEDULES = (CUSTOM, "tuned")

# Sampler and schedule options a request may give at its top level (also settable through
# sampler_options / schedule_options); each is checked against the chosen sampler and schedule.
TOP_LEVEL_OPTIONS = (
    "eta",
    "s_noise",
    "s_churn",
    "s_tmin",
    "s_tmax",
    "r",
    "order",
    "solver_type",
    "rho",
    "sigma_min",
    "sigma_max",
    "shift",  # schedule "flow" (flow-matching models)
)


@dataclass(frozen=True)
class Limits:
    max_steps: int = MAX_STEPS
    max_images: int = 256


def _get(req: Any, name: str) -> Any:
    return getattr(req, name, None)


def build_spec(
    req: Any, defaults: Mapping[str, Any], limits: Limits, discrete: bool = False
) -> tuple[SamplingSpec, int]:
    """The request's spec and its number of images. ``defaults``: the model's (sampler, schedule,
    steps); ``discrete``: whether the model has a discrete sigma table (some schedules need one)."""
    sampler, schedule = _names(req, defaults)
    custom: CustomSchedule | None = None
    if schedule == CUSTOM:
        custom, steps = _custom(req, limits)
    else:
        if registry.get_schedule(schedule).needs_discrete and not discrete:
            raise InputError(
                "schedule", f"schedule {schedule!r} needs a discrete-time model; this one is not"
            )
        steps = _get(req, "steps") if _get(req, "steps") is not None else int(defaults["steps"])
    if not 1 <= steps <= limits.max_steps:
        bounds = [1, limits.max_steps]
        raise InputError(
            "steps", f"steps must be an integer in [1, {limits.max_steps}], got {steps!r}", bounds
        )
    seed = _get(req, "seed")
    n = _get(req, "n") or (len(seed) if isinstance(seed, list) else None) or 1
    if not 1 <= n <= limits.max_images:
        raise InputError("n", f"n must be in [1, {limits.max_images}]", [1, limits.max_images])
    seeds = _seeds(req, n)
    s_opts, k_opts = _options(req, sampler, schedule)
    strength = _get(req, "subseed_strength") or 0.0
    subseed = _get(req, "subseed")
    subseeds = None if subseed is None else [subseed + i for i in range(n)]
    if strength > 0 and subseeds is None:
        raise InputError("subseed", "subseed_strength > 0 needs a subseed")
    denoise = _get(req, "denoise") if _get(req, "denoise") is not None else 1.0
    # spec fields a request sets by name (SamplingSpec.request_fields), passed through as they are
    named = {k: v for k in SamplingSpec.request_fields() if (v := _get(req, k)) is not None}
    try:
        spec = SamplingSpec(
            sampler, custom or schedule, steps, seeds, s_opts, k_opts, denoise, subseeds, strength, **named
        )
    except InputError as exc:
        raise InputError(exc.field, exc.message, exc.allowed) from exc
    return spec, n


def spec_parameters(spec: SamplingSpec) -> dict[str, Any]:
    """The spec as it goes into the PNG parameters (enough to reproduce it)."""
    custom = spec.schedule if isinstance(spec.schedule, CustomSchedule) else None
    out: dict[str, Any] = {
        "sampler": spec.sampler,
        "schedule": CUSTOM if custom is not None else spec.schedule,
        "sigmas": None if custom is None else list(custom.sigmas),
        "steps": spec.steps,
        "seeds": spec.seeds,
        "denoise": spec.denoise,
        "sampler_options": spec.options,
        "schedule_options": spec.schedule_options,
    }
    if spec.subseed_strength > 0:
        out.update(subseeds=spec.subseeds, subseed_strength=spec.subseed_strength)
    for name in SamplingSpec.request_fields():
        if getattr(spec, name) != SamplingSpec.__dataclass_fields__[name].default:
            out[name] = getattr(spec, name)
    return out


def _seeds(req: Any, n: int) -> list[int]:
    if _get(req, "seed") is None:
        return [secrets.randbelow(2**32) for _ in range(n)]
    if isinstance(_get(req, "seed"), int):
        seeds = [_get(req, "seed") + i for i in range(n)]
    else:
        seeds = list(_get(req, "seed"))
        if len(seeds) != n:
            raise InputError("seed", f"seed has {len(seeds)} values for n={n} images; give one int or {n}")
    for s in seeds:
        if not 0 <= s < 2**63:
            raise InputError("seed", f"seeds must be in [0, 2**63), got {s}")
    return seeds


def _options(req: Any, sampler: str, schedule: str) -> tuple[dict[str, Any], dict[str, Any]]:
    s_bounds = registry.get_sampler(sampler).bounds
    k_bounds = {} if schedule == CUSTOM else registry.get_schedule(schedule).bounds
    s_opts: dict[str, Any] = dict(_get(req, "sampler_options") or {})
    k_opts: dict[str, Any] = dict(_get(req, "schedule_options") or {})
    for name in TOP_LEVEL_OPTIONS:
        value = _get(req, name)
        if value is None:
            continue
        if name in s_bounds:
            s_opts[name] = value
        elif name in k_bounds:
            k_opts[name] = value
        else:
            raise InputError(
                name,
                f"{name} does not apply to sampler {sampler!r} or schedule {schedule!r}; "
                f"their options: {', '.join([*s_bounds, *k_bounds]) or 'none'}",
                [*s_bounds, *k_bounds],
            )
    for kind, name, given, bounds in (
        ("sampler", sampler, s_opts, s_bounds),
        ("schedule", schedule, k_opts, k_bounds),
    ):
        field = f"{kind}_options"
        for key, value in given.items():
            if key not in bounds:
                raise InputError(
                    key if key in TOP_LEVEL_OPTIONS else field,
                    f"unknown option {key!r} for {kind} {name!r}; allowed: {', '.join(bounds) or 'none'}",
                    list(bounds),
                )
            try:
                given[key] = bounds[key].check(key, value)
            except ValueError as exc:
                raise InputError(key if key in TOP_LEVEL_OPTIONS else field, str(exc), None) from exc
    return s_opts, k_opts


def _names(req: Any, defaults: Mapping[str, Any]) -> tuple[str, str]:
    """Sampler and schedule, accepting A1111/ComfyUI/diffusers spellings ("DPM++ 2M Karras", "Euler a")."""
    sampler = _get(req, "sampler") or str(defaults["sampler"])
    implied = None
    try:
        if sampler not in registry.SAMPLERS:
            sampler, implied = aliases.resolve(sampler)
        if _get(req, "sigmas") is not None:
            if _get(req, "schedule") not in (None, CUSTOM):
                raise InputError("schedule", f"give a schedule or sigmas, not both (or schedule {CUSTOM!r})")
            return sampler, CUSTOM
        schedule = _get(req, "schedule") or implied or str(defaults["schedule"])
        if schedule == CUSTOM:  # without sigmas (they return above)
            raise InputError("sigmas", f"schedule {CUSTOM!r} needs sigmas: your own descending sigmas")
        if schedule not in registry.SCHEDULES:
            schedule = aliases.resolve_schedule(schedule)
    except registry.UnknownNameError as exc:
        if exc.kind == "schedule":  # the names a request may give, not only the registry's
            exc = registry.UnknownNameError(exc.kind, exc.name, [*exc.valid, *REQUEST_SCHEDULES])
        raise InputError(exc.kind, str(exc), exc.valid) from exc
    return sampler, schedule


def _custom(req: Any, limits: Limits) -> tuple[CustomSchedule, int]:
    """The request's own sigmas as a schedule, and the step count they fix (and the img2img strength)."""
    assert _get(req, "sigmas") is not None
    try:
        custom = CustomSchedule(tuple(_get(req, "sigmas")))
    except ValueError as exc:
        raise InputError("sigmas", str(exc)) from exc
    steps = len(custom()) - 1
    if steps > limits.max_steps:
        raise InputError("sigmas", f"sigmas define {steps} steps; at most {limits.max_steps} are allowed")
    if _get(req, "steps") is not None and _get(req, "steps") != steps:
        raise InputError(
            "steps", f"steps ({_get(req, 'steps')}) does not match the {steps} steps of sigmas; omit it"
        )
    if _get(req, "denoise") is not None and _get(req, "denoise") != 1.0:
        raise InputError("denoise", "with sigmas, their first value sets the img2img strength; omit denoise")
    return custom, steps

"""A1111's sampler and scheduler names (v1.10 lists) <-> ours, through ``service.sampling.aliases``."""

from __future__ import annotations

from functools import cache
from typing import Any

from service.sampling import aliases, registry
from service.sampling.errors import InputError

# A1111 1.10's samplers, in its own order.
A1111_SAMPLERS = (
    "DPM++ 2M",
    "DPM++ SDE",
    "DPM++ 2M SDE",
    "DPM++ 2M SDE Heun",
    "DPM++ 2S a",
    "DPM++ 3M SDE",
    "Euler a",
    "Euler",
    "LMS",
    "Heun",
    "DPM2",
    "DPM2 a",
    "DPM fast",
    "DPM adaptive",
    "Restart",
    "DDIM",
    "DDIM CFG++",
    "PLMS",
    "UniPC",
    "LCM",
)

# A1111's schedulers: (name, label, default_rho, need_inner_model) -> our schedule (None = automatic).
A1111_SCHEDULERS: tuple[tuple[str, str, float, bool, str | None], ...] = (
    ("automatic", "Automatic", -1.0, False, None),
    ("uniform", "Uniform", -1.0, True, "normal"),
    ("karras", "Karras", 7.0, False, "karras"),
    ("exponential", "Exponential", -1.0, False, "exponential"),
    ("polyexponential", "Polyexponential", 1.0, False, "polyexponential"),
    ("sgm_uniform", "SGM Uniform", -1.0, True, "sgm_uniform"),
    ("kl_optimal", "KL Optimal", -1.0, False, "kl_optimal"),
    ("align_your_steps", "Align Your Steps", -1.0, False, "align_your_steps"),
    ("simple", "Simple", -1.0, True, "simple"),
    ("normal", "Normal", -1.0, True, "normal"),
    ("ddim", "DDIM", -1.0, True, "ddim_uniform"),
    ("beta", "Beta", -1.0, True, "beta"),
)


def _resolve_sampler(name: str) -> tuple[str, str | None] | None:
    try:
        return aliases.resolve(name)
    except registry.UnknownNameError:
        return None


@cache
def _display_names() -> dict[str, str]:
    """Our sampler -> the A1111 name that selects it."""
    out: dict[str, str] = {}
    for display in A1111_SAMPLERS:
        found = _resolve_sampler(display)
        if found is not None and found[0] in registry.SAMPLERS:
            out.setdefault(found[0], display)
    return out


def sampler_display(ours: str) -> str:
    return _display_names().get(ours, ours)


def sampler_items() -> list[dict[str, Any]]:
    """GET /sdapi/v1/samplers: A1111's names we serve first, then our other samplers by our names."""
    shown = _display_names()
    items = [
        {"name": display, "aliases": [ours], "options": {}}
        for display in A1111_SAMPLERS
        for ours in [k for k, v in shown.items() if v == display]
    ]
    items += [{"name": s, "aliases": [], "options": {}} for s in registry.SAMPLERS if s not in shown]
    return items


def scheduler_items() -> list[dict[str, Any]]:
    out = []
    for name, label, rho, inner, ours in A1111_SCHEDULERS:
        if ours is None or ours in registry.SCHEDULES:
            out.append(
                {
                    "name": name,
                    "label": label,
                    "aliases": None if ours in (None, name) else [ours],
                    "default_rho": rho,
                    "need_inner_model": inner,
                }
            )
    return out


def schedule_label(ours: str) -> str:
    for _, label, _, _, mapped in A1111_SCHEDULERS:
        if mapped == ours:
            return label
    return ours


def resolve(sampler_name: str | None, scheduler: str | None) -> tuple[str | None, str | None]:
    """Our (sampler, schedule) for A1111's sampler_name and scheduler; None = the model's default."""
    sampler: str | None = None
    implied: str | None = None
    if sampler_name:
        found = _resolve_sampler(sampler_name)
        if found is None or found[0] not in registry.SAMPLERS:
            names = [i["name"] for i in sampler_items()]
            raise InputError(
                "sampler_name", f"sampler {sampler_name!r} not found; valid: {', '.join(names)}", names
            )
        sampler, implied = found
    schedule = implied
    if scheduler and scheduler.strip().lower() != "automatic":
        key = scheduler.strip().lower()
        table = {n: ours for n, label, _, _, ours in A1111_SCHEDULERS} | {
            label.lower(): ours for _, label, _, _, ours in A1111_SCHEDULERS
        }
        schedule = table.get(key)
        if schedule is None:
            try:
                schedule = aliases.resolve_schedule(scheduler)
            except registry.UnknownNameError:
                schedule = None
        if schedule is None or schedule not in registry.SCHEDULES:
            names = [i["name"] for i in scheduler_items()]
            raise InputError(
                "scheduler", f"scheduler {scheduler!r} not found; valid: {', '.join(names)}", names
            )
    return sampler, schedule

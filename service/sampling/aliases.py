"""A1111, ComfyUI, InvokeAI and diffusers spellings of samplers and schedules -> our (sampler, schedule).

``resolve("DPM++ 2M Karras")`` -> ``("dpmpp_2m", "karras")``; ``resolve("Euler a")`` ->
``("euler_ancestral", None)`` (None: the name implies no schedule). Matching ignores case, spaces,
dashes and underscores, and a trailing " Karras" / " Exponential" / "_k" selects that schedule.
Canonical names resolve to themselves. The spellings are registered with each sampler and schedule
(``@sampler(aliases=...)``, ``@schedule(aliases=...)``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from . import registry

# Trailing words that pick a schedule ("DPM++ 2M Karras", InvokeAI's "dpmpp_2m_k").
_SUFFIXES = {"karras": "karras", "k": "karras", "exponential": "exponential"}


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def _table(table: Mapping[str, registry.SamplerInfo | registry.ScheduleInfo]) -> dict[str, str]:
    out = {_key(n): n for n in table}
    for ours, info in table.items():
        for other in info.aliases:
            out.setdefault(_key(other), ours)
    return out


def sampler_aliases() -> dict[str, str]:
    """Normalised spelling -> our sampler name (every registered name included)."""
    return _table(registry.SAMPLERS)


def schedule_aliases() -> dict[str, str]:
    return _table(registry.SCHEDULES)


def resolve_schedule(name: str) -> str:
    """Our schedule name for a peer's spelling; raises UnknownNameError listing the valid ones."""
    found = schedule_aliases().get(_key(name))
    if found is None or found not in registry.SCHEDULES:
        raise registry.UnknownNameError("schedule", name, sorted(registry.SCHEDULES))
    return found


def resolve(name: str) -> tuple[str, str | None]:
    """(sampler, implied schedule or None) for a peer's spelling; raises UnknownNameError."""
    table = sampler_aliases()
    key = _key(name)
    if key in table:
        return table[key], None
    head, _, last = key.rpartition(" ")
    if head and last in _SUFFIXES and head in table:
        return table[head], _SUFFIXES[last]
    raise registry.UnknownNameError("sampler", name, sorted(registry.SAMPLERS))

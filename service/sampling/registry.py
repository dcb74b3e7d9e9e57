"""Name -> sampler / schedule, with the metadata the API, KSampler and the engine need.

The entries are written where each sampler and schedule is defined (``@sampler`` / ``@schedule``,
see :mod:`.catalog`); this module imports every sampler module of :mod:`.samplers` and the schedule
modules so that the tables are complete, and is what the other layers use.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import torch
from torch import Tensor

from . import samplers, schedules, schedules_discrete, schedules_flow  # noqa: F401  (the schedule modules register)
from .catalog import (
    INF,
    SAMPLERS,
    SCHEDULES,
    Bounds,
    Option,
    SamplerInfo,
    ScheduleInfo,
    UnknownNameError,
    check_options,
    get_sampler,
    get_schedule,
    sampler,
    schedule,
)

__all__ = [
    "INF",
    "SAMPLERS",
    "SCHEDULES",
    "Bounds",
    "Option",
    "SamplerInfo",
    "ScheduleInfo",
    "UnknownNameError",
    "check_options",
    "get_sampler",
    "get_schedule",
    "sampler",
    "schedule",
    "schedule_sigmas",
]

# Every module of the samplers package registers its steppers when imported (sorted by name, so the
# order of SAMPLERS does not depend on the file system).
for _module in sorted(m.name for m in pkgutil.iter_modules(samplers.__path__)):
    importlib.import_module(f"{samplers.__name__}.{_module}")


def schedule_sigmas(
    name: str, n: int, sigma_min: float, sigma_max: float, device: torch.device | str = "cpu", **options: Any
) -> Tensor:
    """Sigmas (n + 1, ending in 0) for a registered schedule, options validated."""
    info = get_schedule(name)
    opts = check_options("schedule", name, info.bounds, options)
    sigma_min = opts.pop("sigma_min", sigma_min)
    sigma_max = opts.pop("sigma_max", sigma_max)
    return info.fn(n, sigma_min, sigma_max, device=device, **opts)

"""The flow-matching models' own schedule, ``flow`` (see service/sampling/flow.py).

diffusers' FlowMatchEulerDiscreteScheduler: n times t = shift(u), u linear from 1 to the ramp end,
with SD3's shift t' = s u / (1 + (s - 1) u) (Flux: s = exp(mu)). The ramp end moves with the shift
too: SD3's scheduler ends its ramp at its own table's last time, 1/1000 shifted by the same s (so a
request's ``shift`` moves every time of the schedule, the last included, as diffusers' scheduler
built with that shift and ComfyUI's ModelSamplingSD3 do); Flux's pipelines end it at 1/n.
Registered here (imported by the registry) so that flow.py, which builds on the
registry and the spec, stays out of the registry's imports.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .catalog import Bounds, schedule
from .errors import InputError
from .schedules import _check_n


def shift_time(t: Tensor | float, shift: float) -> Tensor | float:
    """SD3's timestep shift: t' = s t / (1 + (s - 1) t) (Flux: s = exp(mu))."""
    return shift * t / (1 + (shift - 1) * t)


@schedule(
    discrete=True,
    options={"shift": Bounds(lo=0.05, hi=20.0)},
    doc="flow-matching models' own (diffusers FlowMatchEuler): linear in u, through the shift",
    aliases=("FlowMatchEulerDiscreteScheduler", "sd3", "flux"),
)
def get_sigmas_flow(
    n: int, model: Any, shift: float | None = None, device: torch.device | str = "cpu"
) -> Tensor:
    """n times t = shift(u), u linear from 1 to the ramp end, then 0. ``shift`` (s) defaults to the
    model's. Ramp end: ``model.ramp_end`` shifted by s (SD3: 1/1000, its training table's last time),
    or 1/n where ``model.ramp_end`` is None (Flux)."""
    _check_n(n)
    if not getattr(model, "flow", False):
        raise InputError("schedule", "schedule 'flow' is for flow-matching models (SD3, Flux)")
    s = float(model.shift if shift is None else shift)
    # diffusers shifts the table's last time by its shift, then the ramp again: both are this s
    end = 1.0 / n if model.ramp_end is None else float(shift_time(float(model.ramp_end), s))
    u = torch.linspace(1.0, end, n, dtype=torch.float64) if n > 1 else torch.ones(1, dtype=torch.float64)
    t = s * u / (1 + (s - 1) * u)  # shift_time
    return torch.cat([t, t.new_zeros(1)]).float().to(device)

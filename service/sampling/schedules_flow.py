"""The flow-matching models' own schedule, ``flow`` (see service/sampling/flow.py).

diffusers' FlowMatchEulerDiscreteScheduler: n times t = shift(u), u linear from 1 to the ramp end
(SD3: its shifted 1/1000; Flux: 1/n), with SD3's shift t' = s u / (1 + (s - 1) u) (Flux:
s = exp(mu)). Registered here (imported by the registry) so that flow.py, which builds on the
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
    """n times t = shift(u), u linear from 1 to the model's ramp end (SD3: its shifted 1/1000;
    Flux: 1/n), then 0. ``shift`` defaults to the model's."""
    _check_n(n)
    if not getattr(model, "flow", False):
        raise InputError("schedule", "schedule 'flow' is for flow-matching models (SD3, Flux)")
    s = float(model.shift if shift is None else shift)
    end = 1.0 / n if model.ramp_end is None else float(model.ramp_end)
    u = torch.linspace(1.0, end, n, dtype=torch.float64) if n > 1 else torch.ones(1, dtype=torch.float64)
    t = s * u / (1 + (s - 1) * u)  # shift_time
    return torch.cat([t, t.new_zeros(1)]).float().to(device)

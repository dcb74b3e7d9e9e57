"""A1111's and ComfyUI's scheduler names on any model (the A1111, OpenAI and ComfyUI front ends never
refuse one those take).

A1111 runs every scheduler with every model. Four of ours (``normal``/A1111 "uniform" and
"normal", ``sgm_uniform``, ``simple``, ``ddim_uniform``/A1111 "ddim") are rules over a model's
discrete timesteps t = 0 .. T-1, so our core API refuses them for a continuous-time model (the
shipped digits UNet). The frontends run the closest equivalent instead, and say so in the
response (A1111 ``info.comments``):

A continuous-time model's timestep is its noise level on a log scale (the EDM preconditioning
feeds the network c_noise = ln(sigma) / 4), so the same rules are applied to u in [0, 1], the
position between ln(sigma_min) (u = 0) and ln(sigma_max) (u = 1); every one of them is then our
``exponential`` schedule (uniform in log sigma) over a sub-range:

=============  ==========================================  ===================================
ours           rule over the n timesteps                   on a continuous-time model (n steps)
=============  ==========================================  ===================================
normal         n points from T-1 down to 0, both ends      u = 1 .. 0: ``exponential`` as is
sgm_uniform    n+1 points from T-1 to 0, the last dropped  u = 1 .. 1/n: sigma_min raised
simple         every T/n-th entry from the top             u = 1 .. 1/n (the same, T -> inf)
ddim_uniform   1 + k (T // n), k = n-1 .. 0 ("leading")    u = (n-1)/n .. 0: sigma_max lowered
=============  ==========================================  ===================================

Any other schedule a model cannot run falls back to the model's default schedule (also said): a
discrete-only one without a rule above, and on a flow-matching model (SD3, Flux: sigmas are times
in [0, 1]) a schedule with its own fixed sigmas (``align_your_steps``: SD's 14.6 .. 0.03).
"""

from __future__ import annotations

import math
from typing import Any

from service.models.store import LoadedModel
from service.sampling import registry

# ours -> (u of the lowest sigma, u of the highest) for n steps
_CONTINUOUS = {
    "normal": lambda n: (0.0, 1.0),
    "sgm_uniform": lambda n: (1.0 / n, 1.0),
    "simple": lambda n: (1.0 / n, 1.0),
    "ddim_uniform": lambda n: (0.0, (n - 1) / n),
}


def _discrete(model: LoadedModel) -> bool:
    return getattr(model.denoiser, "sigmas", None) is not None


def _at(u: float, lo: float, hi: float) -> float:
    return math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))


def for_model(
    schedule: str, model: LoadedModel, steps: int, denoise: float = 1.0
) -> tuple[str, dict[str, Any], str | None]:
    """(schedule, schedule_options, comment) to run a frontend's ``schedule`` on ``model``: the
    schedule itself where the model can run it (comment None), else its equivalent (see above).
    ``denoise`` < 1 (img2img): the schedule is made for steps / denoise steps and its tail run (as
    ``spec.make_sigmas`` does), so the rule's n is that longer count."""
    if schedule not in registry.SCHEDULES:
        return schedule, {}, None  # not a name we know: the core's 422 names it
    info = registry.get_schedule(schedule)
    default = model.manifest.model_defaults.schedule
    flow = bool(getattr(model.denoiser, "flow", False))
    if flow and not info.needs_discrete and not info.uses_range and schedule != default:
        note = f"schedule {schedule!r}: fixed sigmas outside a flow model's [0, 1]; ran {default!r}"
        return default, {}, note
    if not info.needs_discrete or _discrete(model):
        return schedule, {}, None
    rule = _CONTINUOUS.get(schedule)
    if rule is None:
        note = f"schedule {schedule!r} needs a discrete-time model; ran the model's default {default!r}"
        return default, {}, note
    lo, hi = float(model.denoiser.sigma_min), float(model.denoiser.sigma_max)
    n = steps if denoise >= 1.0 else max(steps, int(steps / denoise))
    u_lo, u_hi = rule(max(1, n))
    options: dict[str, Any] = {}
    if u_lo > 0 or u_hi < 1:
        top = _at(u_hi, lo, hi)
        bottom = _at(u_lo, lo, hi)
        # one step uses sigma_max only; the schedule still needs sigma_min < sigma_max
        options = {"sigma_min": bottom if bottom < top else top / 2, "sigma_max": top}
    span = ", ".join(f"{k}={v:.4g}" for k, v in options.items()) or f"sigma {lo:g}..{hi:g}"
    note = (
        f"model {model.name!r} is continuous-time: scheduler {schedule!r} ran as its equivalent "
        f"'exponential' ({span}; docs/SAMPLERS.md)"
    )
    return "exponential", options, note

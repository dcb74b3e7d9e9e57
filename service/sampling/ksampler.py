"""KSampler: the friendly facade (model + sampler + schedule -> images).

It builds a :class:`~service.sampling.driver.Driver` and runs it with one model call per
evaluation; the engine runs the same driver batched across requests. The pieces (spec, sigmas,
start latents, steppers) live in spec.py and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from . import aliases, registry
from .driver import Driver, drive
from .schedules import Schedule
from .spec import SamplingSpec, make_sigmas, make_steppers, sampling_dtype, start_latents
from .stepper import Callback

__all__ = [
    "KSampler",
    "SamplingSpec",
    "make_sigmas",
    "make_steppers",
    "resolve_names",
    "sampling_dtype",
    "start_latents",
]


def _as_cond(model: Any, condition: Any, batch: int) -> dict[str, Tensor]:
    if condition is None:
        return {}
    if isinstance(condition, Mapping):
        return dict(condition)
    labels = torch.as_tensor(condition, dtype=torch.long).reshape(-1)
    if labels.numel() == 1 and batch > 1:
        labels = labels.expand(batch)
    return {"class_cond": labels}


def _default_uncond(model: Any, cond: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
    if hasattr(model, "uncond_like"):
        return model.uncond_like(cond)
    num_classes = getattr(model, "num_classes", None)
    if "class_cond" in cond and num_classes:
        return {"class_cond": torch.full_like(cond["class_cond"], int(num_classes))}
    return None


def resolve_names(sampler: str, schedule: str | Schedule) -> tuple[str, str | Schedule]:
    """Our names for A1111/ComfyUI/diffusers spellings ("DPM++ 2M Karras" picks its schedule too)."""
    if sampler not in registry.SAMPLERS:
        sampler, implied = aliases.resolve(sampler)
        schedule = implied or schedule
    if isinstance(schedule, str) and schedule not in registry.SCHEDULES:
        schedule = aliases.resolve_schedule(schedule)
    return sampler, schedule


class KSampler:
    """``KSampler(model, sampler="dpmpp_2m", schedule="karras", **options).sample(x, steps=50)``.

    ``options`` holds sampler options (eta, s_noise, ...) and schedule options (rho, sigma_min,
    sigma_max, ...); each is validated against the registry.
    """

    def __init__(
        self,
        model: Any,
        sampler: str = "dpmpp_2m",
        schedule: str | Schedule = "karras",
        coefficients: Sequence[float] | None = None,
        **options: Any,
    ) -> None:
        sampler, schedule = resolve_names(sampler, schedule)
        info = registry.get_sampler(sampler)
        sched_bounds = {} if isinstance(schedule, Schedule) else registry.get_schedule(schedule).bounds
        self.model, self.sampler, self.schedule = model, sampler, schedule
        self.options = {k: v for k, v in options.items() if k in info.bounds}
        self.schedule_options = {k: v for k, v in options.items() if k not in info.bounds}
        unknown = [k for k in self.schedule_options if k not in sched_bounds]
        if unknown:
            allowed = sorted(set(info.bounds) | set(sched_bounds))
            raise ValueError(
                f"unknown option(s) {unknown} for sampler {sampler!r} and schedule {schedule!r}; "
                f"allowed: {', '.join(allowed)}"
            )
        # a tuned solver's per-step coefficients (schedule 'tuned' files; samplers/tuned_multistep.py)
        self.coefficients = None if coefficients is None else [float(c) for c in coefficients]
        SamplingSpec(
            sampler, schedule, 1, [0], self.options, self.schedule_options, coefficients=self.coefficients
        )

    @torch.no_grad()
    def sample(
        self,
        x: Tensor | None = None,
        *,
        steps: int = 20,
        shape: Sequence[int] | None = None,
        seed: int | Sequence[int] | None = None,
        condition: Any = None,
        uncond: Any = None,
        cfg_scale: float = 1.0,
        denoise: float = 1.0,
        init: Tensor | None = None,
        callback: Callback | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Sample images. ``x`` is unit-variance start noise; without it, ``shape`` and ``seed`` make it."""
        if x is None and shape is None:
            raise ValueError("give x (unit-variance start noise) or shape")
        b = int(x.shape[0]) if x is not None else int(shape[0])  # type: ignore[index]
        if seed is None:
            seeds = torch.randint(0, 2**31 - 1, (b,)).tolist()  # reproducible under torch.manual_seed
        elif isinstance(seed, int):
            seeds = [seed + i for i in range(b)]
        else:
            seeds = [int(s) for s in seed]
        spec = SamplingSpec(
            self.sampler,
            self.schedule,
            steps,
            seeds,
            self.options,
            self.schedule_options,
            denoise,
            coefficients=self.coefficients,
        )
        cond = _as_cond(self.model, condition, b)
        if cfg_scale != 1.0 and uncond is None:
            uncond = _default_uncond(self.model, cond)
            if uncond is None:
                raise ValueError("cfg_scale != 1 needs an unconditional input: pass uncond=")
        elif uncond is not None:
            uncond = _as_cond(self.model, uncond, b)
        kw: dict[str, Any] = {"cond": cond, "uncond": uncond, "cfg_scale": cfg_scale, "callback": callback}
        if x is not None:  # the caller's unit-variance start noise: its shape, device and dtype
            shape, device, dtype = x.shape, device or x.device, dtype or x.dtype
        assert shape is not None
        # one path for both: a flow model's prepare (flow forms, Flux's shift, img2img start) runs in it
        driver = Driver.start(
            spec,
            self.model,
            tuple(shape),
            init=init,
            device=device or "cpu",
            dtype=dtype or torch.float32,
            noise=x,
            **kw,
        )
        return drive(driver, self.model)

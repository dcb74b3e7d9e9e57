"""What determines a sample and how its pieces are built: :class:`SamplingSpec`, the schedule's
sigmas (:func:`make_sigmas`), per-image seeded start latents (:func:`start_latents`) and the sampler
steppers with per-image seeded step noise (:func:`make_steppers`). The driver (driver.py) runs them.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from . import registry
from .errors import InputError
from .noise import BrownianNoiseSampler, GaussianNoiseSampler, NoiseSource
from .schedules import Schedule
from .stepper import Callback, Stepper
from .variation import mix

_STEP_STREAM = 0x9E3779B97F4A7C15  # step noise: independent of the start noise of the same seed
REQUEST = {"request": True}
MAX_STEPS = 10_000  # the most steps any spec may have (a service sets its own lower limit)
MAX_NOISE_MULTIPLIER = 4.0  # img2img's noise_multiplier (A1111's slider: 0 to 1.5; its API: any float)


@dataclass(frozen=True)
class StepWindow:
    """Part of a schedule (ComfyUI's KSamplerAdvanced start_at_step / end_at_step): run steps
    ``start`` .. ``end`` of the spec's sigmas (``end`` None: to the last). Stopping early ends at
    sigma 0 (the last step jumps there), or at sigma[end] with its noise left in the latents
    (``leftover_noise``), for a later run to continue from."""

    start: int = 0
    end: int | None = None
    leftover_noise: bool = False

    def apply(self, sigmas: Tensor) -> Tensor:
        if self.end is not None and self.end < len(sigmas) - 1:
            sigmas = sigmas[: self.end + 1].clone()
            if not self.leftover_noise:
                sigmas[-1] = 0
        if not 0 <= self.start < len(sigmas) - 1:
            raise InputError("start_step", f"start_step must be in [0, {len(sigmas) - 1}), got {self.start}")
        return sigmas[self.start :]


@dataclass
class SamplingSpec:
    """Everything that determines a sample besides the model, conditioning and start noise."""

    sampler: str = "dpmpp_2m"
    schedule: str | Schedule = "karras"
    steps: int = 20
    seeds: list[int] = field(default_factory=lambda: [0])
    options: dict[str, Any] = field(default_factory=dict)
    schedule_options: dict[str, Any] = field(default_factory=dict)
    denoise: float = 1.0
    subseeds: list[int] | None = None  # variation seeds (A1111's subseed), one per image
    subseed_strength: float = 0.0  # 0 = the seed's noise, 1 = the subseed's (see variation.py)
    # Fields marked REQUEST are request fields of the same name, passed through as they are by the
    # API (and recorded in the PNG parameters): a new one needs its schema field and its use only.
    guidance_rescale: float = field(default=0.0, metadata=REQUEST)  # CFG rescale (see driver.py)
    # a tuned solver's per-step coefficients (samplers/tuned_multistep.py; schedule "tuned" sets them)
    coefficients: list[float] | None = field(default=None, metadata=REQUEST)
    window: StepWindow | None = None  # run only part of the schedule (ComfyUI's LATENT hand-over)
    # img2img: the start noise times this (A1111's initial_noise_multiplier, "Noise multiplier")
    noise_multiplier: float = field(default=1.0, metadata=REQUEST)

    def __post_init__(self) -> None:
        info = registry.get_sampler(self.sampler)
        self.options = registry.check_options("sampler", self.sampler, info.bounds, self.options)
        if not isinstance(self.schedule, Schedule):
            sched = registry.get_schedule(self.schedule)
            self.schedule_options = registry.check_options(
                "schedule", self.schedule, sched.bounds, self.schedule_options
            )
        elif self.schedule_options:
            raise ValueError("schedule_options apply to named schedules; set them on the Schedule object")
        if (
            isinstance(self.steps, bool)
            or not isinstance(self.steps, int)
            or not 1 <= self.steps <= MAX_STEPS
        ):
            raise ValueError(f"steps must be an integer in [1, {MAX_STEPS}], got {self.steps!r}")
        if not 0.0 < float(self.denoise) <= 1.0:
            raise ValueError(f"denoise must be in (0, 1], got {self.denoise!r}")
        if not self.seeds:
            raise ValueError("seeds must hold one seed per image")
        self.seeds = [int(s) for s in self.seeds]
        if not 0.0 <= float(self.subseed_strength) <= 1.0:
            raise ValueError(f"subseed_strength must be in [0, 1], got {self.subseed_strength!r}")
        if self.subseeds is not None and len(self.subseeds) != len(self.seeds):
            raise ValueError(f"got {len(self.subseeds)} subseeds for {len(self.seeds)} seeds")
        if not 0.0 <= float(self.noise_multiplier) <= MAX_NOISE_MULTIPLIER:
            raise InputError(
                "noise_multiplier",
                f"noise_multiplier must be in [0, {MAX_NOISE_MULTIPLIER:g}], got {self.noise_multiplier!r}",
                [0.0, MAX_NOISE_MULTIPLIER],
            )
        if not 0.0 <= float(self.guidance_rescale) <= 1.0:
            raise InputError(
                "guidance_rescale", f"guidance_rescale must be in [0, 1], got {self.guidance_rescale!r}"
            )
        if self.coefficients is not None and "coefficients" not in inspect.signature(info.stepper).parameters:
            takes = [
                n
                for n, i in registry.SAMPLERS.items()
                if "coefficients" in inspect.signature(i.stepper).parameters
            ]
            raise InputError(
                "coefficients",
                f"sampler {self.sampler!r} takes no coefficients; samplers that do: {takes}",
                takes,
            )

    @staticmethod
    def request_fields() -> tuple[str, ...]:
        """The fields a request sets by name (see REQUEST)."""
        return tuple(f.name for f in fields(SamplingSpec) if f.metadata.get("request"))

    @property
    def info(self) -> registry.SamplerInfo:
        return registry.get_sampler(self.sampler)

    @property
    def run_steps(self) -> int:
        """The steps a driver of this spec runs (``steps``, or its window's part of them)."""
        if self.window is None:
            return self.steps
        return min(self.window.end or self.steps, self.steps) - self.window.start


def make_sigmas(spec: SamplingSpec, model: Any, device: torch.device | str = "cpu") -> Tensor:
    """The schedule's sigmas for ``spec.steps`` steps; with denoise < 1 the tail of a longer schedule."""
    total = spec.steps if spec.denoise >= 1.0 else max(spec.steps, int(spec.steps / spec.denoise))
    if isinstance(spec.schedule, Schedule):
        sigmas = spec.schedule(total, device=device)
    else:
        info = registry.get_schedule(spec.schedule)
        if info.needs_discrete and getattr(model, "sigmas", None) is None:
            raise ValueError(f"schedule {spec.schedule!r} needs a model with a discrete sigma table")
        if info.needs_discrete:
            sigmas = info.fn(total, model, device=device, **spec.schedule_options)
        else:
            opts = dict(spec.schedule_options)  # a request's sigma_min / sigma_max replace the model's
            lo = float(opts.pop("sigma_min", model.sigma_min))
            hi = float(opts.pop("sigma_max", model.sigma_max))
            sigmas = registry.schedule_sigmas(spec.schedule, total, lo, hi, device=device, **opts)
    sigmas = sigmas[-(spec.steps + 1) :]
    _check_descending(sigmas, spec)
    return sigmas if spec.window is None else spec.window.apply(sigmas)


def _check_descending(sigmas: Tensor, spec: SamplingSpec) -> None:
    """Extreme options (karras rho=0.1, beta alpha=0.01, ...) can round sigmas into repeats or zeros,
    which multistep samplers divide by: refuse them here, naming the schedule and its options."""
    body = sigmas[:-1] if sigmas[-1] == 0 else sigmas
    if bool((body > 0).all()) and bool((body[1:] < body[:-1]).all()):
        return
    name = spec.schedule if isinstance(spec.schedule, str) else spec.schedule.name
    given = ", ".join(f"{k}={v}" for k, v in spec.schedule_options.items())
    shown = ", ".join(f"{float(s):.4g}" for s in sigmas[:8]) + (", ..." if len(sigmas) > 8 else "")
    options = list(spec.schedule_options)
    # the one option that did it, else the step count (no options) or the schedule (several together)
    field = options[0] if len(options) == 1 else ("steps" if not options else "schedule")
    raise InputError(
        field,
        f"schedule {name!r}{f' with {given}' if given else ''} gives repeated or zero sigmas for "
        f"{spec.steps} steps ({shown}); use other options or fewer steps",
    )


def sampling_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the sampler state for a model in ``model_dtype``: at least float32.

    Why: step sizes, multistep coefficients and noise at sigma ~ 15 lose too much in fp16/bf16
    (3 and 2 significant digits), so a half-precision model gets float32 inputs and casts them
    itself, as A1111 and ComfyUI keep their latents in float32.
    """
    return torch.promote_types(model_dtype, torch.float32)


def start_latents(
    spec: SamplingSpec,
    shape: Sequence[int],
    sigmas: Tensor,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    init: Tensor | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """Per-image seeded start: noise * sigmas[0], added to ``init`` for img2img. ``noise``: the
    caller's unit-variance start noise of ``shape`` instead of the seeds' (KSampler.sample(x))."""
    if len(spec.seeds) != shape[0]:
        raise ValueError(f"got {len(spec.seeds)} seeds for {shape[0]} images")
    if noise is not None:
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"start noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
        x = noise.to(device=device, dtype=dtype)
    else:
        x = NoiseSource(spec.seeds).randn(shape[1:], device, dtype)
        if spec.subseeds is not None and spec.subseed_strength > 0:
            x = mix(x, NoiseSource(spec.subseeds).randn(shape[1:], device, dtype), spec.subseed_strength)
    if init is None:
        return x * sigmas[0]
    # A1111 (processing.py, img2img's sample): the unit noise times initial_noise_multiplier, then
    # init + noise * sigma_0 (a flow model's prepare keeps the factor: it reads the noise back)
    scale = sigmas[0] * spec.noise_multiplier if spec.noise_multiplier != 1.0 else sigmas[0]
    return init.to(device=device, dtype=dtype) + x * scale


def make_steppers(
    spec: SamplingSpec, x: Tensor, sigmas: Tensor, callback: Callback | None = None
) -> list[tuple[slice, Stepper]]:
    """Steppers covering the images of ``x``: one for all, or one per image for batch-coupled samplers."""
    info = spec.info
    b = x.shape[0]
    parts = [slice(i, i + 1) for i in range(b)] if info.batch_coupled and b > 1 else [slice(0, b)]
    source = NoiseSource(spec.seeds, stream=_STEP_STREAM)
    out = []
    for part in parts:
        xs = x[part]
        noise: Any = None
        if info.noise == "gaussian":
            noise = GaussianNoiseSampler(xs, source.subset(part))
        elif info.noise == "brownian":
            positive = sigmas[sigmas > 0]
            noise = BrownianNoiseSampler(xs, positive.min(), sigmas.max(), spec.seeds[part])
        fitted = {} if spec.coefficients is None else {"coefficients": spec.coefficients}
        out.append(
            (part, info.stepper(xs, sigmas, callback=callback, noise_sampler=noise, **spec.options, **fitted))
        )
    return out

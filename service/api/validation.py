"""Turn a validated SampleRequest into an engine JobRequest, checking it against the model (422s)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import torch

from service.engine.jobs import JobRequest
from service.images import ImageInputError, decode_image
from service.models.lora import text_loras
from service.models.store import LoadedModel
from service.sampling import aliases, registry
from service.sampling.driver import Driver
from service.sampling.errors import InputError
from service.sampling.schedules import CustomSchedule
from service.sampling.spec import SamplingSpec, make_sigmas, sampling_dtype

from .lora_request import lora_parameters, request_loras, with_adapters
from .schemas import TOP_LEVEL_OPTIONS, SampleRequest
from .settings import Settings

CUSTOM = "custom"  # the schedule name of a request that brings its own sigmas


FieldError = InputError  # the one input-error type; rendered as a 422 naming the field


def _seeds(req: SampleRequest, n: int) -> list[int]:
    if req.seed is None:
        return [secrets.randbelow(2**32) for _ in range(n)]
    if isinstance(req.seed, int):
        seeds = [req.seed + i for i in range(n)]
    else:
        seeds = list(req.seed)
        if len(seeds) != n:
            raise FieldError("seed", f"seed has {len(seeds)} values for n={n} images; give one int or {n}")
    for s in seeds:
        if not 0 <= s < 2**63:
            raise FieldError("seed", f"seeds must be in [0, 2**63), got {s}")
    return seeds


def _options(req: SampleRequest, sampler: str, schedule: str) -> tuple[dict[str, Any], dict[str, Any]]:
    s_bounds = registry.get_sampler(sampler).bounds
    k_bounds = {} if schedule == CUSTOM else registry.get_schedule(schedule).bounds
    s_opts: dict[str, Any] = dict(req.sampler_options)
    k_opts: dict[str, Any] = dict(req.schedule_options)
    for name in TOP_LEVEL_OPTIONS:
        value = getattr(req, name)
        if value is None:
            continue
        if name in s_bounds:
            s_opts[name] = value
        elif name in k_bounds:
            k_opts[name] = value
        else:
            raise FieldError(
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
                raise FieldError(
                    key if key in TOP_LEVEL_OPTIONS else field,
                    f"unknown option {key!r} for {kind} {name!r}; allowed: {', '.join(bounds) or 'none'}",
                    list(bounds),
                )
            try:
                given[key] = bounds[key].check(key, value)
            except ValueError as exc:
                raise FieldError(key if key in TOP_LEVEL_OPTIONS else field, str(exc), None) from exc
    return s_opts, k_opts


def _labels(req: SampleRequest, model: LoadedModel, n: int) -> torch.Tensor | None:
    if req.class_label is None:
        return None
    if model.conditioning != "class":
        raise FieldError(
            "class_label", f"model {model.name!r} is not class-conditional; omit class_label", []
        )
    labels = [req.class_label] * n if isinstance(req.class_label, int) else list(req.class_label)
    allowed = f"integers in [0, {model.num_classes - 1}]"
    if len(labels) != n:
        raise FieldError("class_label", f"class_label has {len(labels)} values for n={n} images")
    if any(not 0 <= v < model.num_classes for v in labels):
        raise FieldError(
            "class_label",
            f"class_label must be {allowed} for model {model.name!r}",
            list(range(model.num_classes)),
        )
    return torch.tensor(labels, dtype=torch.long)


def _check_size(req: SampleRequest, model: LoadedModel) -> None:
    h, w = model.image_size
    for field, value, allowed in (("width", req.width, w), ("height", req.height, h)):
        if value is not None and value != allowed:
            raise FieldError(
                field, f"model {model.name!r} makes {w}x{h} images; {field} must be {allowed}", [allowed]
            )


def _conditioning(req: SampleRequest, model: LoadedModel, n: int, cfg: float) -> tuple[dict, dict | None]:
    for field in ("prompt", "negative_prompt", "clip_skip"):
        if getattr(req, field) is not None and model.conditioning != "text":
            raise FieldError(
                field,
                f"model {model.name!r} takes no text; it is {model.conditioning}-conditional"
                + (" (use class_label)" if model.conditioning == "class" else ""),
                [],
            )
    labels = _labels(req, model, n)
    if model.conditioning == "class":
        if labels is None:  # unconditional sample: the null class, nothing to guide against
            return {"class_cond": torch.full([n], model.num_classes, dtype=torch.long)}, None
        cond, uncond = model.class_conditioning(labels)
        return cond, (uncond if cfg != 1.0 else None)
    if model.conditioning == "none":
        if cfg != 1.0:
            raise FieldError(
                "cfg_scale", f"model {model.name!r} is unconditional; cfg_scale must be 1", [1.0]
            )
        return {}, None
    raise FieldError(
        "model", f"model {model.name!r}: {model.conditioning} conditioning is not served yet", []
    )


@dataclass
class _TextJob:
    cond: dict
    uncond: dict | None
    init: torch.Tensor | None
    mask: torch.Tensor | None
    latent_shape: tuple[int, ...]
    image_size: tuple[int, int]


def _text_job(req: SampleRequest, model: LoadedModel, n: int, cfg: float, denoise: float) -> _TextJob:
    """Stable Diffusion: prompts, size, init image and mask through the model's own checks."""
    from service.models.stable_diffusion import SDInputError

    sd = getattr(model, "sd", None)
    if sd is None:
        raise FieldError("model", f"model {model.name!r} has no text encoder loaded", [])
    if req.class_label is not None:
        raise FieldError(
            "class_label", f"model {model.name!r} is text-conditional; use prompt, not class_label", []
        )
    if req.init_image is None and denoise < 1.0:
        raise FieldError("denoise", "denoise < 1 needs an init_image", [1.0])
    images: dict[str, torch.Tensor | None] = {"init_image": None, "mask": None}
    for field, channels in (("init_image", 3), ("mask", 1)):
        data = getattr(req, field)
        if data is None:
            continue
        try:
            t = decode_image(data, None, channels)
        except ImageInputError as exc:
            raise FieldError(field, f"{field}: {exc}") from exc
        images[field] = t if field == "init_image" else (t + 1) / 2
    extra = {} if getattr(req, "guidance", None) is None else {"guidance": req.guidance}
    if extra and not getattr(sd, "takes_guidance", False):  # Flux-dev's distilled guidance input
        raise FieldError("guidance", f"model {model.name!r} takes no guidance (Flux-dev only); omit it", [])
    try:
        inp = sd.job_inputs(
            req.prompt,
            req.negative_prompt,
            n=n,
            cfg_scale=cfg,
            width=req.width,
            height=req.height,
            init_image=images["init_image"],
            mask=images["mask"],
            clip_skip=req.clip_skip,
            **extra,
        )
    except SDInputError as exc:
        raise FieldError(exc.field, exc.message, exc.allowed) from exc
    return _TextJob(inp.cond, inp.uncond, inp.init, inp.mask, inp.latent_shape, inp.image_size)


def _images(
    req: SampleRequest, model: LoadedModel, n: int, denoise: float
) -> tuple[torch.Tensor | None, ...]:
    if req.init_image is None:
        if denoise < 1.0:
            raise FieldError("denoise", "denoise < 1 needs an init_image", [1.0])
        if req.mask is not None:
            raise FieldError("mask", "mask needs an init_image", [])
        return None, None
    try:
        image = decode_image(req.init_image, model.image_size, model.image_channels)
    except ImageInputError as exc:
        raise FieldError("init_image", f"init_image: {exc}") from exc
    init = image if model.encode is None else model.encode(image.to(model.device, model.dtype)).cpu()
    mask = None
    if req.mask is not None:
        lat_hw = model.latent_shape[-2:]
        try:
            mask = (decode_image(req.mask, (lat_hw[0], lat_hw[1]), 1) + 1) / 2
        except ImageInputError as exc:
            raise FieldError("mask", f"mask: {exc}") from exc
    return init.expand(n, *init.shape[1:]).clone(), mask


def _names(req: SampleRequest, defaults: dict[str, Any]) -> tuple[str, str]:
    """Sampler and schedule, accepting A1111/ComfyUI/diffusers spellings ("DPM++ 2M Karras", "Euler a")."""
    sampler = req.sampler or str(defaults.get("sampler", "dpmpp_2m"))
    implied = None
    try:
        if sampler not in registry.SAMPLERS:
            sampler, implied = aliases.resolve(sampler)
        if req.sigmas is not None:
            if req.schedule not in (None, CUSTOM):
                raise FieldError("schedule", f"give a schedule or sigmas, not both (or schedule {CUSTOM!r})")
            return sampler, CUSTOM
        schedule = req.schedule or implied or str(defaults.get("schedule", "karras"))
        if schedule not in registry.SCHEDULES:
            schedule = aliases.resolve_schedule(schedule)
    except registry.UnknownNameError as exc:
        raise FieldError(exc.kind, str(exc), exc.valid) from exc
    return sampler, schedule


def _custom(req: SampleRequest, settings: Settings) -> tuple[CustomSchedule, int]:
    """The request's own sigmas as a schedule, and the step count they fix (and the img2img strength)."""
    assert req.sigmas is not None
    try:
        custom = CustomSchedule(tuple(req.sigmas))
    except ValueError as exc:
        raise FieldError("sigmas", str(exc)) from exc
    steps = len(custom()) - 1
    if steps > settings.max_steps:
        raise FieldError("sigmas", f"sigmas define {steps} steps; at most {settings.max_steps} are allowed")
    if req.steps is not None and req.steps != steps:
        raise FieldError("steps", f"steps ({req.steps}) does not match the {steps} steps of sigmas; omit it")
    if req.denoise is not None and req.denoise != 1.0:
        raise FieldError("denoise", "with sigmas, their first value sets the img2img strength; omit denoise")
    return custom, steps


def _start(
    spec: SamplingSpec,
    model: LoadedModel,
    shape: tuple[int, ...],
    cond: dict[str, torch.Tensor],
    uncond: dict[str, torch.Tensor] | None,
    cfg: float,
    init: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> Driver:
    """Build the job's driver now, on the model's device: the schedule and each sampler's set-up run
    up to its first model evaluation, so options that pass their own bounds but clash (sigma_min >=
    sigma_max, seeds_3's r_1 < r_2, sigmas that round into repeats) are this request's 422 rather
    than a failed job. The engine runs this same driver."""
    try:
        sigmas = make_sigmas(spec, model.denoiser, model.device)
        return Driver.start(
            spec,
            model.denoiser,
            shape,
            cond=cond,
            uncond=uncond,
            cfg_scale=cfg,
            init=init,
            mask=mask,
            device=model.device,
            dtype=sampling_dtype(model.dtype),
            sigmas=sigmas,
        )
    except InputError as exc:  # the core names the option (or steps / sigmas / schedule) at fault
        raise FieldError(_request_field(exc.field, spec), exc.message, exc.allowed) from exc
    except ValueError as exc:
        raise FieldError("sampler", f"sampler {spec.sampler!r}: {exc}") from exc


def _request_field(name: str, spec: SamplingSpec) -> str:
    """The request field for a name the core blamed: a top-level option, or the options dict it
    was given in, or the field itself (steps, schedule, sigmas)."""
    if name in TOP_LEVEL_OPTIONS:
        return name
    if name in spec.options:
        return "sampler_options"
    if name in spec.schedule_options:
        return "schedule_options"
    return name


def build_job(req: SampleRequest, model: LoadedModel, settings: Settings) -> JobRequest:
    d = model.manifest.defaults
    tagged, (req, loras) = req, request_loras(req, model)  # <lora:...> tags leave the prompt
    sampler, schedule = _names(req, d)
    custom: CustomSchedule | None = None
    if schedule == CUSTOM:
        custom, steps = _custom(req, settings)
    else:
        if registry.get_schedule(schedule).needs_discrete and getattr(model.denoiser, "sigmas", None) is None:
            raise FieldError(
                "schedule", f"schedule {schedule!r} needs a discrete-time model; {model.name!r} is not"
            )
        steps = req.steps if req.steps is not None else int(d.get("steps", 20))
    if steps > settings.max_steps:
        raise FieldError("steps", f"steps must be in [1, {settings.max_steps}]", [1, settings.max_steps])
    n = req.n or (len(req.seed) if isinstance(req.seed, list) else None) or 1
    if n > settings.max_images:
        raise FieldError("n", f"n must be in [1, {settings.max_images}]", [1, settings.max_images])
    cfg = req.cfg_scale if req.cfg_scale is not None else float(d.get("cfg_scale", 1.0))
    denoise = req.denoise if req.denoise is not None else 1.0
    timeout = req.timeout_s or settings.job_timeout_s
    if timeout > settings.job_timeout_s:
        raise FieldError("timeout_s", f"timeout_s must be in (0, {settings.job_timeout_s:g}]")
    seeds = _seeds(req, n)
    s_opts, k_opts = _options(req, sampler, schedule)
    latent_shape: tuple[int, ...] | None = None
    if model.conditioning == "text":
        with text_loras(model, loras):
            text = _text_job(req, model, n, cfg, denoise)
        cond, uncond, init, mask = text.cond, text.uncond, text.init, text.mask
        latent_shape, (h, w) = text.latent_shape, text.image_size
    else:
        _check_size(req, model)
        cond, uncond = _conditioning(req, model, n, cfg)
        init, mask = _images(req, model, n, denoise)
        h, w = model.image_size
    strength = req.subseed_strength or 0.0
    subseeds = None if req.subseed is None else [req.subseed + i for i in range(n)]
    if strength > 0 and subseeds is None:
        raise FieldError("subseed", "subseed_strength > 0 needs a subseed")
    # spec fields a request sets by name (SamplingSpec.request_fields), passed through as they are
    named = {k: v for k in SamplingSpec.request_fields() if (v := getattr(req, k, None)) is not None}
    try:
        spec = SamplingSpec(
            sampler, custom or schedule, steps, seeds, s_opts, k_opts, denoise, subseeds, strength, **named
        )
    except InputError as exc:
        raise FieldError(exc.field, exc.message, exc.allowed) from exc
    cond, uncond = with_adapters(model, cond, uncond, loras, n)
    driver = _start(spec, model, (n, *(latent_shape or model.latent_shape)), cond, uncond, cfg, init, mask)
    params: dict[str, Any] = {
        "model": model.name,
        "sampler": sampler,
        "schedule": schedule,
        "sigmas": None if custom is None else list(custom.sigmas),
        "steps": steps,
        "seeds": seeds,
        "n": n,
        "cfg_scale": cfg,
        "class_label": req.class_label,
        "prompt": req.prompt,
        "negative_prompt": req.negative_prompt,
        "width": w,
        "height": h,
        "denoise": denoise,
        **({"subseeds": subseeds, "subseed_strength": strength} if strength > 0 else {}),
        **({"clip_skip": req.clip_skip} if req.clip_skip is not None else {}),
        "img2img": init is not None,
        "inpaint": mask is not None,
        **lora_parameters(tagged, model),
        "sampler_options": s_opts,
        "schedule_options": k_opts,
        **named,
    }
    return JobRequest(spec, n, cond, uncond, cfg, init, mask, timeout, params, latent_shape, driver)

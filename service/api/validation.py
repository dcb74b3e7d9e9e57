"""Turn a validated SampleRequest into an engine JobRequest, checking it against the model (422s)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from service.engine.jobs import JobRequest
from service.image_gate import ImageInputError, to_tensor
from service.models.lora import text_loras
from service.models.store import LoadedModel, Manifest
from service.models.tuned import TUNED, apply_tuned
from service.sampling.driver import Driver
from service.sampling.errors import InputError
from service.sampling.request import CUSTOM, TOP_LEVEL_OPTIONS, Limits, build_spec, spec_parameters
from service.sampling.spec import SamplingSpec, make_sigmas, sampling_dtype

from .lora_request import lora_parameters, request_loras, with_adapters
from .schemas import SampleRequest
from .settings import Settings

FieldError = InputError  # the one input-error type; rendered as a 422 naming the field
__all__ = ["CUSTOM", "FieldError", "build_job"]


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
            t = to_tensor(data, field, None, channels)
        except ImageInputError as exc:
            raise FieldError(exc.field, exc.message, exc.allowed) from exc
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
        image = to_tensor(req.init_image, "init_image", model.image_size, model.image_channels)
    except ImageInputError as exc:
        raise FieldError(exc.field, exc.message, exc.allowed) from exc
    init = image if model.encode is None else model.encode(image.to(model.device, model.dtype)).cpu()
    mask = None
    if req.mask is not None:
        lat_hw = model.latent_shape[-2:]
        try:
            mask = (to_tensor(req.mask, "mask", (lat_hw[0], lat_hw[1]), 1) + 1) / 2
        except ImageInputError as exc:
            raise FieldError(exc.field, exc.message, exc.allowed) from exc
    return init.expand(n, *init.shape[1:]).clone(), mask


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


def _spec(
    req: SampleRequest, manifest: Manifest, settings: Settings, discrete: bool
) -> tuple[SampleRequest, SamplingSpec, int, float]:
    """(request with a tuned schedule resolved, spec, images, timeout): the part of a request's
    checks that needs the model's manifest only."""
    req = apply_tuned(req, manifest.folder, manifest.name, manifest.defaults)
    spec, n = build_spec(req, manifest.defaults, Limits(settings.max_steps, settings.max_images), discrete)
    timeout = req.timeout_s or settings.job_timeout_s
    if timeout > settings.job_timeout_s:
        raise FieldError("timeout_s", f"timeout_s must be in (0, {settings.job_timeout_s:g}]")
    return req, spec, n, timeout


def precheck(req: SampleRequest, manifest: Manifest, settings: Settings) -> None:
    """Check what needs no loaded model (sampler, schedule and their options, steps, seeds, n,
    timeout), so a request for a model that is still loading is a 422 now rather than a failed job
    later. Whether a schedule needs a discrete-time model is left to :func:`build_job`."""
    _spec(req, manifest, settings, discrete=True)


def build_job(req: SampleRequest, model: LoadedModel, settings: Settings) -> JobRequest:
    """The engine job for ``req`` on ``model``: the spec (shared with ``kdiff sample``), the model's
    own inputs, and the driver, built once here and run by the engine."""
    d = model.manifest.defaults
    tagged, (req, loras) = req, request_loras(req, model)  # <lora:...> tags leave the prompt
    discrete = getattr(model.denoiser, "sigmas", None) is not None
    tuned = req.schedule == TUNED  # the model's tuned sigmas for its sampler and steps
    req, spec, n, timeout = _spec(req, model.manifest, settings, discrete)
    cfg = req.cfg_scale if req.cfg_scale is not None else float(d.get("cfg_scale", 1.0))
    latent_shape: tuple[int, ...] | None = None
    if model.conditioning == "text":
        with text_loras(model, loras):
            text = _text_job(req, model, n, cfg, spec.denoise)
        cond, uncond, init, mask = text.cond, text.uncond, text.init, text.mask
        latent_shape, (h, w) = text.latent_shape, text.image_size
    else:
        _check_size(req, model)
        cond, uncond = _conditioning(req, model, n, cfg)
        init, mask = _images(req, model, n, spec.denoise)
        h, w = model.image_size
    cond, uncond = with_adapters(model, cond, uncond, loras, n)
    driver = _start(spec, model, (n, *(latent_shape or model.latent_shape)), cond, uncond, cfg, init, mask)
    params: dict[str, Any] = {
        "model": model.name,
        **spec_parameters(spec),
        "n": n,
        "cfg_scale": cfg,
        "class_label": req.class_label,
        "prompt": req.prompt,
        "negative_prompt": req.negative_prompt,
        "width": w,
        "height": h,
        **({"clip_skip": req.clip_skip} if req.clip_skip is not None else {}),
        "img2img": init is not None,
        "inpaint": mask is not None,
        **lora_parameters(tagged, model),
    }
    if tuned:
        params["schedule"] = TUNED
    return JobRequest(spec, n, cond, uncond, cfg, init, mask, timeout, params, latent_shape, driver)

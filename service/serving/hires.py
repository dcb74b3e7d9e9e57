"""A1111's hires fix on our requests: a first pass at the request's size, then img2img at a larger one.

What A1111's ``modules/processing.py`` (``StableDiffusionProcessingTxt2Img``) does, and so this:
- target size: ``width * scale`` x ``height * scale`` (int), or ``resize_x`` / ``resize_y`` (one set:
  the other follows the first pass's aspect ratio; both: upscale to cover, then centre-crop the
  latents);
- the upscale: a latent mode (``F.interpolate`` of the first pass's latents: bilinear, bicubic,
  nearest, nearest-exact, with or without antialias), else decode, resize the 8-bit image (``None``
  and ``Lanczos``: Lanczos, ``Nearest``: nearest; upscaler models registered in
  :data:`PIXEL_UPSCALERS`), encode;
- second pass: img2img from the upscaled latents with fresh noise from the same seeds (and
  subseeds), the hires prompts encoded at the hires size (their <lora:...> tags are the second pass's
  LoRAs, in place of the first prompt's), the hires sampler / schedule (default: the
  first pass's); because its step count is given, the schedule is built for
  ``int(steps / denoise)`` steps and its last ``steps`` run (the same tail our img2img takes, with
  ``x = init + noise * sigma_0``; flow models start from ``(1 - t0) init + t0 noise``).

ControlNet units pick their passes (sd-webui-controlnet's ``hr_option``, ``hook.disabled_by_hr_option``):
``both``, ``low_res_only`` (the first pass), ``high_res_only`` (the second); without a hires fix every
unit applies (the extension passes ``Both`` then).

The second pass's conditioning and spec are built and checked with the request (a bad hires field
is its 422); the job's driver (:class:`service.sampling.passes.Passes`) continues into it, so second
passes run through the engine and batch with other requests at that size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from service.models.stepcache import KEY as CACHE_KEY
from service.models.upscalers import LATENT_UPSCALE_MODES as LATENT_MODES
from service.sampling.driver import Driver
from service.sampling.errors import InputError
from service.sampling.passes import Passes
from service.sampling.request import TOP_LEVEL_OPTIONS, Limits
from service.sampling.spec import SamplingSpec, make_sigmas, sampling_dtype

if TYPE_CHECKING:
    from service.models.store import LoadedModel

    from .loras import Resolved
    from .request import GenerationRequest

DEFAULT_UPSCALER = "Latent"  # A1111's latent_upscale_default_mode
DEFAULT_DENOISE = 0.75  # A1111's txt2img denoising_strength default
# Pixel upscalers: name -> (8-bit RGB image, width, height) -> that image at that size. The plain
# resizes are here; the upscaler models add theirs (register_pixel_upscaler).
PixelUpscaler = Callable[[Image.Image, int, int], Image.Image]
PIXEL_UPSCALERS: dict[str, PixelUpscaler] = {
    "None": lambda im, w, h: im.resize((w, h), Image.Resampling.LANCZOS),
    "Lanczos": lambda im, w, h: im.resize((w, h), Image.Resampling.LANCZOS),
    "Nearest": lambda im, w, h: im.resize((w, h), Image.Resampling.NEAREST),
}


def register_pixel_upscaler(name: str, upscale: PixelUpscaler) -> None:
    """Make an upscaler (a model) usable as a hires fix ``upscaler`` by its name."""
    PIXEL_UPSCALERS[name] = upscale


def upscaler_names(models: Iterable[str] = ()) -> list[str]:
    """Every name ``upscaler`` takes: the latent modes, the plain resizes, then the upscaler
    models' names (``models``: the model pool's ``upscalers.names()``)."""
    return list(dict.fromkeys([*LATENT_MODES, *PIXEL_UPSCALERS, *models]))


@dataclass(frozen=True)
class HiresFix:
    """The hires fix of one request (our API's ``hires`` object; A1111's ``enable_hr`` fields)."""

    scale: float | None = None  # default 2 (unless resize_x / resize_y)
    resize_x: int | None = None  # 0 or None: unset
    resize_y: int | None = None
    upscaler: str | None = None  # default "Latent"
    steps: int | None = None  # default: the first pass's
    denoise: float | None = None  # default 0.75
    sampler: str | None = None  # default: the first pass's
    schedule: str | None = None  # default: the first pass's
    prompt: str | None = None  # default: the first pass's
    negative_prompt: str | None = None


@dataclass(frozen=True)
class HiresSize:
    """Where the first pass's latents go: upscaled to ``upscale`` (width, height), then centre-cropped
    to ``final`` (the hires image's size)."""

    upscale: tuple[int, int]
    final: tuple[int, int]


def target_size(hr: HiresFix, width: int, height: int, multiple: int, field: str = "hires") -> HiresSize:
    """A1111's ``calculate_target_resolution`` for a first pass of ``width`` x ``height``; the final
    size floored to the model's ``multiple``."""
    rx, ry = hr.resize_x or 0, hr.resize_y or 0
    if rx == 0 and ry == 0:
        scale = 2.0 if hr.scale is None else float(hr.scale)
        up = (int(width * scale), int(height * scale))
        want = up
    elif ry == 0:
        up = want = (rx, rx * height // width)
    elif rx == 0:
        up = want = (ry * width // height, ry)
    else:
        want = (rx, ry)
        up = (rx, rx * height // width) if width / height < rx / ry else (ry * width // height, ry)
    final = (want[0] - want[0] % multiple, want[1] - want[1] % multiple)
    if min(final) < multiple:
        raise InputError(field, f"the hires size {want[0]}x{want[1]} is below {multiple} pixels a side")
    return HiresSize(up, final)


def check_upscaler(name: str | None, field: str = "hires", models: Iterable[str] = ()) -> str:
    """The upscaler a request names (default ``Latent``), or InputError listing those available."""
    name = DEFAULT_UPSCALER if name is None else name
    names = upscaler_names(models)
    if name not in names:
        raise InputError(field, f"unknown upscaler {name!r}; available: {', '.join(names)}", names)
    return name


def model_names(upscalers: Any) -> list[str]:
    """The upscaler models of the pool's ``upscalers`` (service.models.upscalers; None: none)."""
    return [] if upscalers is None else list(upscalers.names())


def with_hires(
    request: GenerationRequest,
    model: LoadedModel,
    first: Driver,
    spec: SamplingSpec,
    limits: Limits,
    max_timeout_s: float,
    image_size: tuple[int, int],
    loras: Resolved,
    upscalers: Any = None,
) -> tuple[Passes, dict[str, Any]]:
    """The job's driver continuing into its hires pass, and the hires parameters it records.
    ``image_size``: the first pass's (height, width); ``upscalers``: the pool's upscaler models."""
    from service.models.lora import text_loras

    from .loras import request_loras, with_adapters
    from .request import check_spec, start_driver

    hr = request.hires
    assert hr is not None
    if model.fixed_size or model.encode is None or model.decode is None:
        raise InputError(
            "hires", f"model {model.name!r} makes one image size; hires fix needs a text-to-image model", []
        )
    upscaler = check_upscaler(hr.upscaler, "hires", model_names(upscalers))
    if upscaler not in LATENT_MODES and upscaler not in PIXEL_UPSCALERS:
        # load the model now (cached): a file it cannot use is this request's 422, naming the file
        upscalers.upscale(torch.zeros(1, 3, 8, 8), upscaler, size=(8, 8), field="hires")
    multiple = int(getattr(getattr(model, "text_model", None), "multiple", 8))
    size = target_size(hr, image_size[1], image_size[0], multiple)
    limit = model.size_limit()
    if max(size.final) > limit or max(size.upscale) > 2 * limit:
        raise InputError(
            "hires",
            f"the hires size {size.final[0]}x{size.final[1]} is over this model's limit of {limit} a side",
            [8, limit],
        )
    second = _second_request(request, hr, spec, size.final)
    if hr.prompt:
        # A1111 (processing.py sample_hr_pass): the second pass activates the hires prompt's own
        # <lora:...> tags, not the first prompt's; the tags leave the text as in the first pass
        try:
            second, loras = request_loras(second, model)
        except InputError as exc:
            raise InputError("hires", f"hires prompt: {exc.message}", exc.allowed) from exc
    second, spec2, n, _ = check_spec(second, model.manifest, limits, max_timeout_s, discrete=_discrete(model))
    spec2 = dataclasses.replace(
        spec2, seeds=spec.seeds, subseeds=spec.subseeds, subseed_strength=spec.subseed_strength
    )
    cfg = request.cfg_scale if request.cfg_scale is not None else model.manifest.model_defaults.cfg_scale
    with text_loras(model, loras.text):
        inputs = model.job_inputs(second, n=n, cfg_scale=cfg, denoise=1.0)
    cond, uncond = with_adapters(model, inputs.cond, inputs.uncond, loras.unet, n)
    cond, uncond = same_cache_rows(first, cond, uncond)
    shape = (n, *(inputs.latent_shape or model.latent_shape))
    zeros = torch.zeros(shape, device=model.device, dtype=sampling_dtype(model.dtype))
    start_driver(spec2, model, shape, cond, uncond, cfg, zeros, None)  # its options are this request's 422
    sigmas = make_sigmas(spec2, model.denoiser, model.device)

    def next_pass(latents: Tensor) -> Driver:
        init = _crop(upscale(model, latents, upscaler, size.upscale, upscalers), shape[-2:])
        driver = Driver.start(
            spec2, model.denoiser, shape, cond=cond, uncond=uncond, cfg_scale=cfg, init=init,
            device=model.device, dtype=sampling_dtype(model.dtype), sigmas=sigmas,
        )  # fmt: skip
        model.bind_driver(driver)  # sigma-dependent conditioning (ControlNet windows) for this pass
        return driver

    info = spec2.info
    tracks = n if info.batch_coupled and n > 1 else 1
    evals = info.expected_nfe(spec2.steps, spec2.options) * tracks
    params = _parameters(hr, upscaler, spec, spec2, second, size, request)
    return Passes(first, next_pass, spec2.steps, evals), params


def same_cache_rows(
    first: Driver, cond: dict[str, Any], uncond: dict[str, Any] | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The second pass's rows keep the first pass's step-cache rows (models/stepcache): the same ids,
    freed with the job; the new size makes their first evaluation there a full one."""
    if CACHE_KEY not in first.cond:
        return cond, uncond
    cond = {**cond, CACHE_KEY: first.cond[CACHE_KEY]}
    if uncond is not None and first.uncond is not None:
        uncond = {**uncond, CACHE_KEY: first.uncond[CACHE_KEY]}
    return cond, uncond


def _discrete(model: LoadedModel) -> bool:
    return getattr(model.denoiser, "sigmas", None) is not None


def _second_request(
    request: GenerationRequest, hr: HiresFix, spec: SamplingSpec, final: tuple[int, int]
) -> GenerationRequest:
    """The second pass as a request: the hires prompts, sampler, schedule, steps and strength at the
    final size, from the first pass's seeds. A sampler or schedule of its own drops the first pass's
    options (they were given for the first's)."""
    changes: dict[str, Any] = {
        "steps": hr.steps or spec.steps,
        "denoise": DEFAULT_DENOISE if hr.denoise is None else hr.denoise,
        "sigmas": None,
        "coefficients": None,  # a tuned solver's were fitted to the first pass's sigmas
        "noise_multiplier": None,  # A1111's is img2img's; its hires pass starts from plain noise
        "seed": list(spec.seeds),
        "width": final[0],
        "height": final[1],
        "init_image": None,
        "mask": None,
        "hires": None,
        "timeout_s": None,
    }
    if hr.prompt:
        changes["prompt"] = hr.prompt
    if hr.negative_prompt:
        changes["negative_prompt"] = hr.negative_prompt
    first_schedule = None if request.sigmas is not None or request.schedule == "custom" else request.schedule
    changes["schedule"] = hr.schedule or first_schedule
    changes["sampler"] = hr.sampler or request.sampler
    if (hr.sampler and hr.sampler != request.sampler) or (hr.schedule and hr.schedule != request.schedule):
        changes |= {name: None for name in TOP_LEVEL_OPTIONS}
        changes |= {"sampler_options": {}, "schedule_options": {}}
    return pass_units(request.replace(**changes), second=True)


# a ControlNet unit's passes: ours, and sd-webui-controlnet's HiResFixOption values (any case)
HR_OPTIONS = {
    "both": "both",
    "low_res_only": "low_res_only",
    "low res only": "low_res_only",
    "high_res_only": "high_res_only",
    "high res only": "high_res_only",
}


def hr_option(value: Any, field: str) -> str:
    """A unit's ``hr_option`` as ours (``both``, ``low_res_only``, ``high_res_only``); else a 422."""
    key = value.strip().lower() if isinstance(value, str) else None
    if key not in HR_OPTIONS:
        allowed = ["Both", "Low res only", "High res only"]
        raise InputError(field, f"{field} must be one of {', '.join(allowed)}, got {value!r}", allowed)
    return HR_OPTIONS[key]


def pass_units(request: GenerationRequest, second: bool) -> GenerationRequest:
    """The request as one hires pass sees its ControlNet units: those whose ``hr_option`` leaves that
    pass out are dropped (the first pass of a request without hires keeps them all)."""
    units = request.controlnets
    if not units or (request.hires is None and not second):
        return request
    skip = "low_res_only" if second else "high_res_only"
    kept = [u for u in units if hr_option(u.hr_option, "controlnets.hr_option") != skip]
    return request if len(kept) == len(units) else request.replace(controlnets=kept or None)


def upscale(
    model: LoadedModel, latents: Tensor, upscaler: str, size: tuple[int, int], upscalers: Any = None
) -> Tensor:
    """The first pass's latents at ``size`` (width, height) in pixels: interpolated, or decoded,
    resized as 8-bit images (as A1111 does: a plain resize, or an upscaler model's passes then
    Lanczos to the size, ``upscalers.upscale``) and encoded."""
    scale = max(1, model.image_size[0] // model.latent_shape[-2])  # pixels per latent
    lh, lw = size[1] // scale, size[0] // scale
    if upscaler in LATENT_MODES:
        mode, antialias = LATENT_MODES[upscaler]
        return F.interpolate(latents, size=(lh, lw), mode=mode, antialias=antialias)
    assert model.decode is not None and model.encode is not None
    # A1111 takes the decoded image to 8 bits (x_sample.astype(np.uint8): truncated) before resizing
    eight = (((model.decode(latents).float().cpu().clamp(-1, 1) + 1) / 2) * 255).to(torch.uint8)
    if upscaler in PIXEL_UPSCALERS:
        resize = PIXEL_UPSCALERS[upscaler]
        out = []
        for image in eight:
            big = resize(Image.fromarray(image.permute(1, 2, 0).numpy()), lw * scale, lh * scale)
            out.append(torch.from_numpy(np.asarray(big.convert("RGB"), dtype=np.float32)).permute(2, 0, 1))
        pixels = torch.stack(out) / 255
    else:  # an upscaler model; its result comes back as an 8-bit image in A1111 too
        big = upscalers.upscale(eight.float() / 255, upscaler, size=(lh * scale, lw * scale), field="hires")
        pixels = (big.float().cpu().clamp(0, 1) * 255).round() / 255
    return model.encode(pixels * 2 - 1).to(latents.dtype)


def _crop(latents: Tensor, hw: tuple[int, ...]) -> Tensor:
    """A1111's truncate: the centre (top / left rounded down) of the upscaled latents."""
    h, w = int(hw[0]), int(hw[1])
    top, left = (latents.shape[-2] - h) // 2, (latents.shape[-1] - w) // 2
    return latents[..., top : top + h, left : left + w].contiguous()


def _parameters(
    hr: HiresFix,
    upscaler: str,
    spec: SamplingSpec,
    spec2: SamplingSpec,
    second: GenerationRequest,
    size: HiresSize,
    request: GenerationRequest,
) -> dict[str, Any]:
    """What a result records of its hires pass (the PNG parameters; infotext's ``Hires ...``)."""
    out: dict[str, Any] = {"upscaler": upscaler, "steps": spec2.steps, "denoise": spec2.denoise}
    if hr.resize_x or hr.resize_y:
        out["resize_x"], out["resize_y"] = hr.resize_x or 0, hr.resize_y or 0
    else:
        out["scale"] = 2.0 if hr.scale is None else float(hr.scale)
    out["sampler"] = spec2.sampler
    out["schedule"] = spec2.schedule if isinstance(spec2.schedule, str) else "custom"
    if second.prompt != request.prompt:
        out["prompt"] = second.prompt
    if second.negative_prompt != request.negative_prompt:
        out["negative_prompt"] = second.negative_prompt
    out["width"], out["height"] = size.final
    return out

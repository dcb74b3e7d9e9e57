"""A1111 txt2img / img2img bodies -> our GenerationRequests (one per ``n_iter`` batch), for a model
the route has loaded (this module loads nothing).

What does not map one to one, and is said in ``info`` (``comments``):
- what a prompt and a size become is the model family's (``LoadedModel.prompt_inputs``): a
  class-conditional model (the shipped ``digits``) reads the class from the prompt, a fixed-size
  model generates at its own size, text models floor width/height to a multiple of 8; the images
  are resized back to the requested size;
- conditioning fields of ours that A1111 has no name for (``guidance``, ...) pass through by name;
- hires fix (``enable_hr``) becomes our ``hires`` object (``a1111_hires.py``); a model of one size
  resizes its image to the hires size instead;
- fields we do not implement (face restoration, tiling, styles, inpaint full resolution,
  inpainting fill, resize mode 3's latent upscale) are ignored; unknown fields too, silently (as
  A1111); scripts and a refiner that do not run here are 422s (a1111_scripts.py).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageFilter, ImageOps

from service import a1111_names, image_gate
from service.image_gate import GatedImage, ImageInputError
from service.models.store import LoadedModel, PromptAsk
from service.sampling import registry
from service.sampling.errors import InputError
from service.serving.request import GenerationRequest, frontend_fields

from ..schemas import generation_request
from . import a1111_controlnet, a1111_options, a1111_scripts, frontend_schedules, limits
from .a1111_cache import cache_field
from .a1111_hires import Hires, plan_hires
from .a1111_resize import fill, resize_image
from .a1111_schemas import Img2ImgRequest, Txt2ImgRequest

SAMPLER_FIELDS = ("eta", "s_churn", "s_tmin", "s_tmax", "s_noise")


@dataclass
class Plan:
    """The translated request: our bodies, and what A1111's response reports."""

    model: LoadedModel
    bodies: list[GenerationRequest]
    seeds: list[int]
    subseeds: list[int]
    size: tuple[int, int]  # requested (width, height)
    generated: tuple[int, int]  # what the model makes (width, height)
    sampler: str
    schedule: str
    steps: int
    cfg_scale: float
    clip_skip: int
    class_labels: list[int | None] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    hires: Hires | None = None  # txt2img's hires fix: the result's size and its infotext fields
    # inpainting: (the init image, its mask) pasted back over each result (A1111's overlay)
    overlay: tuple[Image.Image, Image.Image] | None = None

    @property
    def out_size(self) -> tuple[int, int]:
        """The (width, height) of the images returned: the hires size, else the asked size."""
        return self.hires.size if self.hires is not None else self.size


def model_name(wanted: str, models: Collection[str]) -> str:
    """Our model for an A1111 checkpoint title ("name", "name.safetensors", "name [hash]")."""
    base = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", wanted.strip())
    base = re.sub(r"\.(safetensors|ckpt|pt|bin)$", "", base)
    for candidate in (wanted, base, base.rsplit("/", 1)[-1]):
        if candidate in models:
            return candidate
    names = sorted(models)
    raise InputError("sd_model_checkpoint", f"model {wanted!r} not found; valid: {', '.join(names)}", names)


def checkpoint(
    body: Txt2ImgRequest, options: dict[str, Any], default_model: str, models: Collection[str]
) -> str:
    """The model a request asks for: its override_settings, else the caller's /options, else ours."""
    overrides = body.override_settings or {}
    wanted = overrides.get("sd_model_checkpoint") or options.get("sd_model_checkpoint") or default_model
    return model_name(str(wanted), models)


def _ignored(body: Txt2ImgRequest) -> list[str]:
    out = []
    flags = [("restore_faces", "face restoration"), ("tiling", "tiling")]
    flags += [("enable_hr", "hires fix (txt2img only)")] if isinstance(body, Img2ImgRequest) else []
    out += [f"{name} ({what}) is not supported; ignored" for name, what in flags if getattr(body, name)]
    if body.styles:
        out.append("styles are not supported; ignored")
    if body.save_images:
        out.append("save_images: images are not saved on the server")
    if isinstance(body, Img2ImgRequest):
        if body.mask is not None and body.inpaint_full_res:
            out.append("inpaint_full_res is not supported; the whole image is inpainted")
        if body.mask is not None and body.inpainting_fill in (2, 3):
            out.append(
                "inpainting_fill 2 / 3 (latent noise / nothing) are not supported; "
                "masked content starts from the original"
            )
        if body.resize_mode == 3:
            out.append("resize_mode 3 (latent upscale) runs as 0: the image is stretched to the size")
        if len(body.init_images) > 1:
            out.append("only the first of init_images is used")
    return out


def _sampler_options(body: Txt2ImgRequest, sampler: str) -> dict[str, Any]:
    """A1111 sends eta / s_* with every request; keep those the sampler takes, within bounds."""
    bounds = registry.get_sampler(sampler).bounds
    out: dict[str, Any] = {}
    for name in SAMPLER_FIELDS:
        value = getattr(body, name)
        if value is None or name not in bounds or (name == "s_tmax" and value == 0):
            continue
        try:
            out[name] = bounds[name].check(name, value)
        except ValueError:
            continue
    return out


def _mask(body: Img2ImgRequest, size: tuple[int, int]) -> GatedImage:
    """A1111's mask (white = repaint; inverted on request; blurred by mask_blur) at the image size."""
    assert body.mask is not None
    img = _gated(body.mask, "mask").image
    # A1111's create_binary_mask: a painted mask's alpha is the stroke (rounded to 0 / 255), unless
    # the alpha is opaque everywhere: then the picture itself is the mask
    if img.mode in ("RGBA", "LA") and img.getextrema()[-1] != (255, 255):
        img = img.getchannel("A").point(lambda a: 255 if a > 128 else 0)
    img = img.convert("L")
    if body.inpainting_mask_invert:
        img = ImageOps.invert(img)
    if body.resize_mode in (1, 2):  # cropped / filled as the init image is
        img = resize_image(body.resize_mode, img, body.width, body.height)
    if img.size != size:
        img = img.resize(size, Image.Resampling.BILINEAR)
    blur = mask_blur(body)
    if any(blur):
        img = img.filter(ImageFilter.GaussianBlur(blur))
    return GatedImage(img, "mask")


def mask_blur(body: Img2ImgRequest) -> tuple[int, int]:
    """The mask's blur (x, y) as A1111 reads it: ``mask_blur`` sets both axes when given."""
    if body.mask_blur is not None:
        return body.mask_blur, body.mask_blur
    x, y = body.mask_blur_x, body.mask_blur_y
    return (4 if x is None else x), (4 if y is None else y)


def _gated(data: str, field: str) -> GatedImage:
    """An A1111 image field through the gate (decoded once; our request takes it as it is)."""
    try:
        return image_gate.load(data, field)
    except ImageInputError as exc:
        raise InputError(exc.field, exc.message, exc.allowed) from exc


def plan(
    body: Txt2ImgRequest,
    model: LoadedModel,
    options: dict[str, Any],
    max_images: int,
    upscalers: Collection[str] = (),
) -> Plan:
    """Translate one A1111 request (``options``: the caller's /options) for ``model`` (the one
    :func:`checkpoint` names) into our requests; ``upscalers``: the upscaler models' names."""
    overrides = body.override_settings or {}
    d = model.manifest.model_defaults
    sampler, schedule = a1111_names.resolve(body.sampler_name or body.sampler_index, body.scheduler)
    sampler, schedule = sampler or d.sampler, schedule or d.schedule
    steps = body.steps or d.steps
    cfg = body.cfg_scale if body.cfg_scale is not None else d.cfg_scale
    comments = _ignored(body)
    a1111_scripts.check(body, model, comments)  # scripts that do not run here: a 422
    img2img = isinstance(body, Img2ImgRequest) and body.denoising_strength is not None
    denoise = float(body.denoising_strength or 1.0) if img2img else 1.0
    schedule, schedule_options, note = frontend_schedules.for_model(schedule, model, steps, denoise)
    comments += [note] if note else []
    clip_skip = a1111_options.clip_skip(overrides, options)
    total = body.batch_size * body.n_iter
    if body.batch_size > max_images:
        raise InputError("batch_size", f"batch_size must be in [1, {max_images}]", [1, max_images])
    if total > 16 * max_images:
        raise InputError("n_iter", f"batch_size * n_iter must be at most {16 * max_images}")
    for name in ("seed", "subseed") if body.subseed_strength > 0 else ("seed",):  # image i: seed + i
        if getattr(body, name) + total > 2**63:
            raise InputError(name, f"{name} + batch_size * n_iter - 1 must be below 2**63")
    seed = body.seed if body.seed >= 0 else secrets.randbelow(2**32)
    subseed = body.subseed if body.subseed >= 0 else secrets.randbelow(2**32)
    seeds = [seed + i for i in range(total)]
    subseeds = [subseed + i for i in range(total)]
    size = (body.width, body.height)
    common: dict[str, Any] = {
        "model": model.name,
        "sampler": sampler,
        "schedule": schedule,
        "steps": steps,
        "n": body.batch_size,
        **_sampler_options(body, sampler),
        **frontend_fields(body.model_extra or {}),
        **cache_field(body.model_extra or {}, overrides, options, hires=body.enable_hr, steps=steps),
    }
    if schedule_options:
        common["schedule_options"] = schedule_options
    if body.subseed_strength > 0:
        common["subseed_strength"] = body.subseed_strength
    asked = model.prompt_inputs(PromptAsk(body.prompt, body.negative_prompt or None, cfg, size, clip_skip))
    common |= asked.fields
    comments += asked.notes
    gen = asked.generated
    if gen != size and model.fixed_size:
        limits.check_resize(size, total, ("width", "height", "n_iter"))
    if gen != size:
        comments.append(f"model {model.name!r} generated {gen[0]}x{gen[1]}; resized to {size[0]}x{size[1]}")
    hires = None
    if body.enable_hr and not isinstance(body, Img2ImgRequest):
        hires = plan_hires(body, model, steps, comments, upscalers)
        if hires.fields is not None:
            common["hires"] = hires.fields
        else:
            limits.check_resize(hires.size, total, ("hr_scale", "hr_scale", "n_iter"))
    original: GatedImage | None = None
    if isinstance(body, Img2ImgRequest):
        fields, original = _img2img(body, model, gen, comments)
        common |= fields
        multiplier = a1111_options.noise_multiplier(body.initial_noise_multiplier, overrides, options)
        if multiplier != 1.0:
            common["noise_multiplier"] = multiplier
    init_resize = body.resize_mode if isinstance(body, Img2ImgRequest) else 0
    control = a1111_controlnet.units(
        body.alwayson_scripts,
        original,
        init_resize,
        hires is not None and hires.fields is not None,
    )
    if control is not None:
        common["controlnets"] = control
    images = a1111_controlnet.ip_units(body.alwayson_scripts, original)
    if images is not None:
        common["ip_adapters"] = images
    bodies = []
    for it in range(body.n_iter):
        part = seeds[it * body.batch_size : (it + 1) * body.batch_size]
        if body.subseed_strength > 0:
            common["subseed"] = subseeds[it * body.batch_size]
        bodies.append(generation_request({**common, "seed": part}))
    return Plan(
        model,
        bodies,
        seeds,
        subseeds,
        size,
        gen,
        sampler,
        schedule,
        steps,
        cfg,
        clip_skip,
        [asked.label],
        comments,
        hires,
        _overlay(original, common.get("mask")),
    )


def _overlay(init: GatedImage | None, mask: Any) -> tuple[Image.Image, Image.Image] | None:
    """An inpainting request's init image (as sent, not filled) and (blurred) mask, for the results'
    overlay."""
    if not isinstance(init, GatedImage) or not isinstance(mask, GatedImage):
        return None
    return init.image, mask.image


def _img2img(
    body: Img2ImgRequest, model: LoadedModel, gen: tuple[int, int], comments: list[str]
) -> tuple[dict[str, Any], GatedImage]:
    """Our img2img fields for the body, and its init image as sent (resize_mode applied; not filled:
    the overlay and ControlNet units read this one, as A1111's read p.init_images)."""
    if not body.init_images:
        raise InputError("init_images", "img2img needs init_images (one base64 image)")
    init = _gated(body.init_images[0], "init_images")
    if body.resize_mode in (1, 2):  # A1111's crop / fill to width x height (0, 3: stretched later)
        init = GatedImage(resize_image(body.resize_mode, init.image, body.width, body.height), "init_images")
    strength = body.denoising_strength if body.denoising_strength is not None else 0.75
    if strength <= 0:
        raise InputError("denoising_strength", "denoising_strength must be > 0", [0.0, 1.0])
    out: dict[str, Any] = {"init_image": init, "denoise": strength}
    if body.mask is not None:
        out["mask"] = _mask(body, model.mask_size(init.image.size, gen))
        if body.inpainting_fill == 0:  # A1111's default "fill"; the overlay keeps the original
            out["init_image"] = GatedImage(fill(init.image, out["mask"].image), "init_images")
    return out, init

"""OpenAI Images requests -> one GenerationRequest, for a model the route has loaded (this module
loads nothing).

- ``model``: one of ours, or an OpenAI name (dall-e-2, dall-e-3, gpt-image-*) = the default model;
- ``size`` "WxH" ("auto" or none: the model's own; an edit's, OpenAI's "auto", follows the image:
  :func:`_edit_size`); a fixed-size model generates at its size and the images are resized (as on
  the A1111 routes); a class-conditional model reads the class from the prompt (a digit 0-9 or its
  English word);
- edits: the image is the init image; a mask (or the image's own alpha) marks with transparent
  pixels what to repaint (OpenAI's convention; a mask without alpha: white = repaint).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, cast

from PIL import Image

from service import a1111_names, image_gate
from service.image_gate import GatedImage, ImageInputError
from service.models.store import LoadedModel, PromptAsk
from service.sampling.errors import InputError
from service.serving.request import GenerationRequest, frontend_fields

from ..schemas import generation_request
from . import frontend_schedules, limits
from .errors import OpenAIError
from .openai_schemas import ImageGenerationRequest

OPENAI_MODELS = re.compile(r"^(dall-e-\d|gpt-image-[\w.-]+|chatgpt-image.*)$")
_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*$")


@dataclass
class Translated:
    model: LoadedModel
    body: GenerationRequest
    size: tuple[int, int]  # what the client gets (width, height)
    generated: tuple[int, int]
    comments: list[str] = field(default_factory=list)


def model_for(name: str | None, models: Collection[str], default: str) -> str:
    """Our model for an OpenAI model name (dall-e-2/3, gpt-image-*: the default)."""
    if not name or OPENAI_MODELS.match(name):
        return default
    if name in models:
        return name
    raise OpenAIError(
        404,
        f"The model '{name}' does not exist; available: {', '.join(sorted(models))}",
        "model",
        "model_not_found",
    )


def _size(text: str | None, model: LoadedModel) -> tuple[int, int] | None:
    if text is None or text.strip().lower() == "auto":
        return None
    m = _SIZE.match(text)
    if m is None:
        raise OpenAIError(
            400,
            f"Invalid size {text!r}: give 'WIDTHxHEIGHT' (e.g. '1024x1024') or 'auto'",
            "size",
            "invalid_size",
        )
    w, h = int(m.group(1)), int(m.group(2))
    limit = model.size_limit()
    if not (8 <= w <= limit and 8 <= h <= limit):
        raise OpenAIError(
            400, f"Invalid size {text!r}: width and height must be in [8, {limit}]", "size", "invalid_size"
        )
    return w, h


# OpenAI's quality names as multiples of the model's steps (medium, standard, auto: its own)
QUALITY_STEPS = {"low": 0.5, "high": 2, "hd": 2, "xhigh": 3, "max": 4}


def _steps(req: ImageGenerationRequest, model: LoadedModel, max_steps: int) -> int | None:
    if req.steps is not None:
        return req.steps
    factor = QUALITY_STEPS.get(req.quality or "auto")
    if factor is None:
        return None
    return min(max_steps, max(1, int(model.manifest.model_defaults.steps * factor)))


def translate(
    req: ImageGenerationRequest,
    model: LoadedModel,
    max_steps: int,
    image: bytes | None = None,
    mask: bytes | None = None,
) -> Translated:
    """One OpenAI request for ``model`` (the one :func:`model_for` names, loaded by the route)."""
    asked = _size(req.size, model)
    init = None if image is None else _open(image, "image")
    if init is not None and asked is None:
        asked = _edit_size(init.size, model)
    comments: list[str] = []
    fields: dict[str, Any] = {
        "model": model.name,
        "n": req.n,
        "seed": req.seed,
        "sampler": req.sampler,
        "schedule": req.schedule,
        "steps": _steps(req, model, max_steps),
        **frontend_fields(req.model_extra or {}),
    }
    family = model.prompt_inputs(PromptAsk(req.prompt, req.negative_prompt, req.cfg_scale, asked))
    fields |= family.fields
    comments += family.notes
    gen = family.generated
    size = asked or gen
    if size != gen and model.fixed_size:
        try:
            limits.check_resize(size, req.n, ("size", "size", "n"))
        except InputError as exc:
            raise OpenAIError(400, exc.message, exc.field, "invalid_size") from exc
    if init is not None:
        fields |= _edit_inputs(init, mask, model, gen, req.denoise)
    if req.schedule is not None:  # A1111's scheduler names too, run on any model
        denoise = float(fields.get("denoise") or 1.0)
        fields |= _schedule(req.schedule, model, fields["steps"], denoise, comments)
    if size != gen:
        comments.append(f"generated {gen[0]}x{gen[1]}; resized to {size[0]}x{size[1]}")
    body = generation_request({k: v for k, v in fields.items() if v is not None})
    return Translated(model, body, size, gen, comments)


def _schedule(
    name: str, model: LoadedModel, steps: int | None, denoise: float, comments: list[str]
) -> dict[str, Any]:
    try:
        _, schedule = a1111_names.resolve(None, name)
    except InputError as exc:
        message = exc.message.replace("scheduler", "schedule", 1)
        raise OpenAIError(400, message, "schedule", "invalid_value") from exc
    if schedule is None:  # "automatic": the model's own
        return {"schedule": None}
    steps = steps or model.manifest.model_defaults.steps
    schedule, options, note = frontend_schedules.for_model(schedule, model, steps, denoise)
    comments += [note] if note else []
    return {"schedule": schedule, "schedule_options": options or None}


def _open(data: bytes, field_name: str) -> Image.Image:
    """An uploaded file through the image gate, turned upright: a phone photo is stored sideways with
    an EXIF orientation that every viewer applies (so does the mask the user drew on it); edited as
    stored, its result came back rotated (ComfyUI's LoadImage applies it too)."""
    try:
        img = image_gate.load(data, field_name).image
    except ImageInputError as exc:
        raise OpenAIError(400, exc.message, exc.field, "invalid_image") from exc
    return image_gate.upright(img)


def _edit_size(image: tuple[int, int], model: LoadedModel) -> tuple[int, int] | None:
    """The size of an edit that asks none (OpenAI's edits default to "auto": the model picks a size
    of its own with the image's orientation): the model's default pixel area in the image's aspect
    ratio (a phone photo on SD 1.5 runs near 512 x 512, not at 2048 a side; a small image is scaled
    up to what the model was trained at), within the model's limit, then floored by the model's rule
    for an init image (its multiple, as on /sample); None on a fixed-size model (its own size)."""
    w, h = image
    dh, dw = model.image_size
    scale = math.sqrt(dh * dw / (w * h))
    w, h = max(1, int(w * scale)), max(1, int(h * scale))
    longest, limit = max(w, h), model.size_limit()
    if longest > limit:  # in integers: the long side is exactly the limit
        w, h = w * limit // longest, h * limit // longest
    return model.edit_size((w, h))


def _edit_inputs(
    init: Image.Image, mask: bytes | None, model: LoadedModel, gen: tuple[int, int], denoise: float | None
) -> dict[str, Any]:
    repaint: Image.Image | None = None
    source = _open(mask, "mask") if mask is not None else init
    if source.mode in ("RGBA", "LA", "PA") or "transparency" in source.info:
        alpha = source.convert("RGBA").getchannel("A")
        if cast(int, alpha.getextrema()[0]) < 255 or mask is not None:  # transparent pixels: repaint
            repaint = alpha.point(lambda a: 255 if a == 0 else 0)
    elif mask is not None:
        repaint = source.convert("L")
    # Our request takes the decoded images as they are: an upload is not re-encoded to base64 PNG (a
    # 2600x2600 photo re-encoded passed the 16 MB base64 limit of the field).
    out: dict[str, Any] = {"init_image": GatedImage(init, "image")}
    if repaint is not None:
        target = model.mask_size(init.size, gen)
        out["mask"] = GatedImage(repaint.resize(target, Image.Resampling.BILINEAR), "mask")
        if denoise is not None:
            out["denoise"] = denoise
    else:
        out["denoise"] = denoise if denoise is not None else 0.75
    return out

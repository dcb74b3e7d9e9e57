"""The pixel models' requests (the project UNet: unconditional, or class-conditional like the shipped
``digits``): class labels, guidance against the null class, the fixed image size, init image and mask.
``LoadedModel.job_inputs`` runs this for them; text-to-image models have their own
(``text_image.TextLoadedModel``)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from service.image_gate import ImageInputError, to_tensor
from service.sampling.errors import InputError

if TYPE_CHECKING:
    from service.serving.request import GenerationRequest

    from .store import JobInputs, LoadedModel, PromptAsk, PromptInputs

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_DIGIT = re.compile(r"(?<![\w.])(\d)(?![\w.])|\b(" + "|".join(DIGIT_WORDS) + r")\b", re.IGNORECASE)


def class_from_prompt(prompt: str) -> int | None:
    """The first digit 0-9 (standing alone) or English digit word in the prompt."""
    m = _DIGIT.search(prompt)
    if m is None:
        return None
    return int(m.group(1)) if m.group(1) is not None else DIGIT_WORDS.index(m.group(2).lower())


def pixel_prompt_inputs(model: LoadedModel, ask: PromptAsk) -> PromptInputs:
    from .store import PromptInputs

    h, w = model.image_size
    out = PromptInputs({}, (w, h))
    if model.conditioning == "class":
        out.label = class_from_prompt(ask.prompt)
        if out.label is not None and out.label < model.num_classes:
            out.fields = {"class_label": out.label, "cfg_scale": ask.cfg_scale}
        else:
            out.notes.append(f"no class 0-{model.num_classes - 1} in the prompt: unconditional sample")
    else:
        out.notes.append(f"model {model.name!r} is unconditional: prompt and cfg_scale are ignored")
    if ask.negative_prompt:
        out.notes.append("negative_prompt is ignored by this model (it reads no text)")
    if ask.clip_skip != 1:
        out.notes.append(
            "clip skip (CLIP_stop_at_last_layers) is ignored by this model (it has no text encoder)"
        )
    return out


def pixel_inputs(model: LoadedModel, req: GenerationRequest, n: int, cfg: float, denoise: float) -> JobInputs:
    from .store import JobInputs

    h, w = model.image_size
    for field, value, allowed in (("width", req.width, w), ("height", req.height, h)):
        if value is not None and value != allowed:
            raise InputError(
                field, f"model {model.name!r} makes {w}x{h} images; {field} must be {allowed}", [allowed]
            )
    cond, uncond = _conditioning(model, req, n, cfg)
    init, mask = _images(model, req, n, denoise)
    return JobInputs(cond, uncond, init, mask)


def _labels(model: LoadedModel, req: GenerationRequest, n: int) -> Tensor | None:
    if req.class_label is None:
        return None
    if model.conditioning != "class":
        raise InputError(
            "class_label", f"model {model.name!r} is not class-conditional; omit class_label", []
        )
    labels = [req.class_label] * n if isinstance(req.class_label, int) else list(req.class_label)
    if len(labels) != n:
        raise InputError("class_label", f"class_label has {len(labels)} values for n={n} images")
    if any(not 0 <= v < model.num_classes for v in labels):
        raise InputError(
            "class_label",
            f"class_label must be in [0, {model.num_classes - 1}] (integers) for model {model.name!r}",
            list(range(model.num_classes)),
        )
    return torch.tensor(labels, dtype=torch.long)


def _conditioning(
    model: LoadedModel, req: GenerationRequest, n: int, cfg: float
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    for field in ("prompt", "negative_prompt", "clip_skip"):
        if getattr(req, field) is not None:
            raise InputError(
                field,
                f"model {model.name!r} takes no text; it is {model.conditioning}-conditional"
                + (" (use class_label)" if model.conditioning == "class" else ""),
                [],
            )
    labels = _labels(model, req, n)
    if model.conditioning == "class":
        if labels is None:  # unconditional sample: the null class, nothing to guide against
            return {"class_cond": torch.full([n], model.num_classes, dtype=torch.long)}, None
        cond, uncond = model.class_conditioning(labels)
        return cond, (uncond if cfg != 1.0 else None)
    if model.conditioning == "none":
        if cfg != 1.0:
            raise InputError(
                "cfg_scale", f"model {model.name!r} is unconditional; cfg_scale must be 1", [1.0]
            )
        return {}, None
    raise InputError(
        "model", f"model {model.name!r}: {model.conditioning} conditioning is not served yet", []
    )


def _images(
    model: LoadedModel, req: GenerationRequest, n: int, denoise: float
) -> tuple[Tensor | None, Tensor | None]:
    if req.init_image is None:
        if denoise < 1.0:
            raise InputError("denoise", "denoise < 1 needs an init_image", [1.0])
        if req.mask is not None:
            raise InputError("mask", "mask needs an init_image", [])
        return None, None
    try:
        image = to_tensor(req.init_image, "init_image", model.image_size, model.image_channels)
    except ImageInputError as exc:
        raise InputError(exc.field, exc.message, exc.allowed) from exc
    init = image if model.encode is None else model.encode(image.to(model.device, model.dtype)).cpu()
    mask = None
    if req.mask is not None:
        lat_hw = model.latent_shape[-2:]
        try:
            mask = (to_tensor(req.mask, "mask", (lat_hw[0], lat_hw[1]), 1) + 1) / 2
        except ImageInputError as exc:
            raise InputError(exc.field, exc.message, exc.allowed) from exc
    return init.expand(n, *init.shape[1:]).clone(), mask

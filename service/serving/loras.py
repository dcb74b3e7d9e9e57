"""A request's LoRAs: the ``loras`` field and A1111's ``<lora:name:weight>`` prompt tags (removed from
the prompt before it is encoded), resolved against the model (422 naming an unknown or unfitting one),
and the per-row adapter tensor they add to the conditioning."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, NamedTuple

from torch import Tensor

from service.models.lora import KEY, LoraError
from service.models.store import LoadedModel
from service.sampling.errors import InputError

if TYPE_CHECKING:
    from .request import GenerationRequest

TAG = re.compile(r"<lora:([^:<>]+)((?::[^:<>]*)*)>")
MAX_WEIGHT = 10.0  # the ``loras`` field's bound (LoraRef.weight)


class Tag(NamedTuple):
    """One LoRA as A1111 applies it: a weight for the text encoders and one for the UNet."""

    name: str
    te: float
    unet: float


class Resolved(NamedTuple):
    """A request's adapters on a model as (id, weight): the UNet's (per row) and the text encoders'."""

    unet: list[tuple[int, float]]
    text: list[tuple[int, float]]


NONE = Resolved([], [])


def _weight(tag: str, text: str, default: float) -> float:
    if not text.strip():
        return default
    try:
        weight = float(text)
    except ValueError as exc:
        raise InputError("prompt", f"LoRA tag {tag!r}: the weight {text!r} is not a number") from exc
    if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:  # "nan", "inf", "1e400" parse
        raise InputError("prompt", f"LoRA tag {tag!r}: a weight must be a finite number in [-10, 10]")
    return weight


def _tag(m: re.Match[str]) -> Tag:
    """A1111's extra_networks_lora: ``<lora:name:te[:unet]>`` (unet defaults to te), or ``te=`` /
    ``unet=`` named; ``dyn`` (a rank cut) is refused, not ignored, since it would change the image."""
    positional, named = [], {}
    for arg in m.group(2).split(":")[1:]:
        key, eq, value = arg.partition("=")
        if eq:
            named[key.strip()] = value
        else:
            positional.append(arg)
    if "dyn" in named or len(positional) > 2:
        raise InputError("prompt", f"LoRA tag {m.group(0)!r}: dyn (a rank limit) is not supported")
    te = _weight(m.group(0), named.get("te", positional[0] if positional else ""), 1.0)
    unet = _weight(m.group(0), named.get("unet", positional[1] if len(positional) > 1 else ""), te)
    return Tag(m.group(1).strip(), te, unet)


def prompt_tags(prompt: str | None) -> tuple[str | None, list[Tag]]:
    """The prompt without its ``<lora:name[:weight[:unet weight]]>`` tags, and the tags."""
    if prompt is None or "<lora:" not in prompt:
        return prompt, []
    tags = [_tag(m) for m in TAG.finditer(prompt)]
    clean = re.sub(r"\s*,\s*,", ",", TAG.sub("", prompt)).strip(" ,")
    return clean, tags


def _field_tags(req: GenerationRequest) -> list[Tag]:
    return [Tag(ref.name, ref.weight, ref.weight) for ref in req.loras or []]


def _all(req: GenerationRequest) -> list[Tag]:
    return _field_tags(req) + prompt_tags(req.prompt)[1]


def request_loras(req: GenerationRequest, model: LoadedModel) -> tuple[GenerationRequest, Resolved]:
    """The request with tag-free prompts, and its adapters on ``model``."""
    prompt, tagged = prompt_tags(req.prompt)
    tags = _field_tags(req) + tagged
    if prompt != req.prompt:
        req = req.replace(prompt=prompt)
    if not tags:
        return req, NONE
    field = "loras" if req.loras else "prompt"
    if model.adapters is None:
        raise InputError(field, f"model {model.name!r} takes no LoRA", [])
    try:  # one lookup (a scan of the store's LoRA folders) for both weights
        unet = model.adapters.resolve([(t.name, t.unet) for t in tags])
    except LoraError as exc:
        raise InputError(field, exc.message, exc.allowed) from exc
    return req, Resolved(unet, [(i, t.te) for (i, _), t in zip(unet, tags, strict=True)])


def with_adapters(
    model: LoadedModel,
    cond: dict[str, Tensor],
    uncond: dict[str, Tensor] | None,
    resolved: list[tuple[int, float]],
    n: int,
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """Every request to a model with adapter support carries the per-row adapter tensor (rows without
    LoRA too: then they share calls with rows that have one). The guidance rows get the same LoRAs."""
    if model.adapters is None:
        return cond, uncond
    rows = model.adapters.encode(resolved, n)
    return {**cond, KEY: rows}, None if uncond is None else {**uncond, KEY: rows}


def lora_parameters(req: GenerationRequest, model: LoadedModel) -> dict[str, Any]:
    """The PNG / result parameters: every LoRA the request used, by name and weight (and the UNet's
    weight where a tag gave it its own)."""
    out = [
        {"name": t.name, "weight": t.te} | ({"unet_weight": t.unet} if t.unet != t.te else {})
        for t in _all(req)
    ]
    return {"loras": out} if out else {}

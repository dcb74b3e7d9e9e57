"""A request's LoRAs: the ``loras`` field and A1111's ``<lora:name:weight>`` prompt tags (removed from
the prompt before it is encoded), resolved against the model (422 naming an unknown or unfitting one),
and the per-row adapter tensor they add to the conditioning."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from torch import Tensor

from service.models.lora import KEY, LoraError
from service.models.store import LoadedModel
from service.sampling.errors import InputError

if TYPE_CHECKING:
    from .request import GenerationRequest

TAG = re.compile(r"<lora:([^:<>]+)(?::([^:<>]*))?(?::[^<>]*)?>")
MAX_WEIGHT = 10.0  # the ``loras`` field's bound (LoraRef.weight)


def prompt_tags(prompt: str | None) -> tuple[str | None, list[tuple[str, float]]]:
    """The prompt without its ``<lora:name[:weight]>`` tags, and the tags' (name, weight) pairs."""
    if prompt is None or "<lora:" not in prompt:
        return prompt, []
    pairs = []
    for m in TAG.finditer(prompt):
        try:
            weight = float(m.group(2)) if m.group(2) else 1.0
        except ValueError as exc:
            raise InputError("prompt", f"LoRA tag {m.group(0)!r}: the weight is not a number") from exc
        if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:  # "nan", "inf", "1e400" parse
            raise InputError(
                "prompt", f"LoRA tag {m.group(0)!r}: the weight must be a finite number in [-10, 10]"
            )
        pairs.append((m.group(1).strip(), weight))
    clean = re.sub(r"\s*,\s*,", ",", TAG.sub("", prompt)).strip(" ,")
    return clean, pairs


def request_loras(
    req: GenerationRequest, model: LoadedModel
) -> tuple[GenerationRequest, list[tuple[int, float]]]:
    """The request with tag-free prompts, and its adapters as (id, weight) on ``model``."""
    prompt, tags = prompt_tags(req.prompt)
    pairs = [(ref.name, ref.weight) for ref in req.loras or []] + tags
    if prompt != req.prompt:
        req = req.replace(prompt=prompt)
    if not pairs:
        return req, []
    field = "loras" if req.loras else "prompt"
    if model.adapters is None:
        raise InputError(field, f"model {model.name!r} takes no LoRA", [])
    try:
        return req, model.adapters.resolve(pairs)
    except LoraError as exc:
        raise InputError(field, exc.message, exc.allowed) from exc


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
    """The PNG / result parameters: every LoRA the request used, by name and weight."""
    _, tags = prompt_tags(req.prompt)
    pairs = [(ref.name, ref.weight) for ref in req.loras or []] + tags
    return {"loras": [{"name": n, "weight": w} for n, w in pairs]} if pairs else {}

"""OpenAI's JSON image edit body (``POST /v1/images/edits`` with ``Content-Type: application/json``):
``{"images": [{"image_url": "data:image/png;base64,..."}], "mask": {"image_url": ...}, "prompt": ...}``,
the form OpenAI's API reference gives beside multipart.

Images come as base64 data URLs only: this server fetches no URL (``image_url`` naming an http(s)
address would make it a proxy into the network it runs in) and has no Files API (``file_id``); both
are refused naming the field. Of several images the first is edited, as with ``image[]`` parts.
"""

from __future__ import annotations

import json
from typing import Any

from service import image_gate
from service.image_gate import ImageInputError

from .errors import OpenAIError


def _image(ref: Any, field: str) -> bytes:
    if not isinstance(ref, dict) or not isinstance(ref.get("image_url"), str):
        if isinstance(ref, dict) and ref.get("file_id") is not None:
            raise OpenAIError(
                400,
                f"{field}.file_id: there is no Files API here; send image_url as a data URL",
                f"{field}.file_id",
                "invalid_value",
            )
        raise OpenAIError(
            400, f'{field}: expected {{"image_url": "data:image/png;base64,..."}}', field, "invalid_value"
        )
    url = ref["image_url"]
    if url.lower().startswith(("http://", "https://")):
        raise OpenAIError(
            400,
            f"{field}.image_url: image URLs are not fetched (this server makes no outgoing requests); "
            "send the image as a base64 data URL, or as a multipart file",
            f"{field}.image_url",
            "invalid_value",
        )
    try:
        return image_gate.b64_bytes(url, f"{field}.image_url")
    except ImageInputError as exc:
        raise OpenAIError(400, exc.message, exc.field, "invalid_image") from exc


def parse(raw: bytes) -> tuple[dict[str, Any], bytes, bytes | None]:
    """The body's other fields, its first image's bytes and its mask's (torch-free, but a 20 MB
    body: called off the event loop)."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise OpenAIError(
            400, f"the body is not valid JSON ({type(exc).__name__})", None, "invalid_json"
        ) from exc
    if not isinstance(body, dict):
        raise OpenAIError(400, "the body must be a JSON object", None, "invalid_json")
    images = body.pop("images", None)
    if not isinstance(images, list) or not images:
        raise OpenAIError(
            400,
            '\'images\' is required: a list of {"image_url": "<base64 data URL>"} (or send '
            "multipart/form-data with the image as a file part)",
            "images",
            "missing_required_parameter",
        )
    mask = body.pop("mask", None)
    return body, _image(images[0], "images[0]"), None if mask is None else _image(mask, "mask")

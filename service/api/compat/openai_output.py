"""What OpenAI's image responses say about their images: the file format (``output_format``,
``output_compression``), the background, the quality, and the GPT image models' ``usage``.

Images are generated as PNGs (with their parameters in text chunks); a request for JPEG or WebP gets
them re-encoded at ``output_compression`` (OpenAI's 0-100, default 100: the encoder's quality; PNG is
lossless and ignores it). Our models paint every pixel: ``background: "transparent"`` is refused, as
OpenAI refuses it for its models that cannot make one.
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image

from service.images import PARAMETERS_KEY

from .a1111_encode import exif_args
from .errors import OpenAIError
from .openai_schemas import ImageGenerationRequest, OutputFormat

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# OpenAI's quality names (DALL-E 3's standard / hd too) -> what the responses report: the GPT image
# models' names (the openai client's ImagesResponse.quality and the events' quality)
REPORTED_QUALITY = {
    "low": "low",
    "medium": "medium",
    "standard": "medium",
    "auto": "medium",
    "high": "high",
    "hd": "high",
    "xhigh": "xhigh",
    "max": "max",
}
# The GPT image models' usage, in tokens; a local model counts none (nothing is billed by token).
NO_USAGE: dict[str, Any] = {
    "input_tokens": 0,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
    "output_tokens": 0,
    "output_tokens_details": {"image_tokens": 0, "text_tokens": 0},
    "total_tokens": 0,
}


def check(req: ImageGenerationRequest, model: str) -> None:
    """Refuse what cannot be made, before any work: a transparent background."""
    if req.background == "transparent":
        raise OpenAIError(
            400,
            f"Transparent background is not supported for this model ({model!r} paints every pixel): "
            "use background 'opaque' or 'auto'",
            "background",
            "invalid_value",
        )


def output_format(req: ImageGenerationRequest) -> OutputFormat:
    return req.output_format or "png"


def quality(req: ImageGenerationRequest) -> str:
    return REPORTED_QUALITY[req.quality or "auto"]


def encode(img: Image.Image | bytes, req: ImageGenerationRequest) -> bytes:
    """``img`` (a PIL image, or our PNG: returned as it is for PNG output) in the asked format (our
    PNG's infotext in a JPEG's / WebP's EXIF UserComment)."""
    fmt = output_format(req)
    if fmt == "png":
        if isinstance(img, bytes):
            return img
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()
    infotext = None
    if isinstance(img, bytes):
        img = Image.open(io.BytesIO(img))
        infotext = img.info.get(PARAMETERS_KEY)  # kept in EXIF UserComment, as A1111 keeps it
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    if fmt == "webp" and img.mode == "L":
        img = img.convert("RGB")  # WebP has no grayscale mode
    compression = 100 if req.output_compression is None else req.output_compression
    buf = io.BytesIO()
    img.save(buf, format=fmt.upper(), quality=compression, **exif_args(infotext, fmt))
    return buf.getvalue()


def sniff(data: bytes) -> str:
    """The media type of an image we made (a link's bytes carry their format)."""
    if data[:3] == b"\xff\xd8\xff":
        return MEDIA_TYPES["jpeg"]
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return MEDIA_TYPES["webp"]
    return MEDIA_TYPES["png"]

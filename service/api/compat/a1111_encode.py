"""How A1111's API encodes the images it returns (``modules/api/api.py`` ``encode_pil_to_base64``):
in the ``samples_format`` option's format, PNG with the infotext in its ``parameters`` chunk, JPEG or
WebP (``jpeg_quality``; WebP lossless with ``webp_lossless``) with it in EXIF UserComment as piexif's
``UserComment.dump(text, encoding="unicode")`` writes it: ``b"UNICODE\\0"`` then UTF-16 big-endian.

Which options count: A1111 encodes after ``process_images`` has restored the options a request's
``override_settings`` changed, so an override's ``samples_format`` decides the format only with
``override_settings_restore_afterwards: false`` (then it also stays set, as every override does)."""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image

from service.images import png_bytes

FORMATS = ("png", "jpg", "jpeg", "webp")
DEFAULTS = {"samples_format": "png", "jpeg_quality": 80, "webp_lossless": False}  # A1111's shared_options
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286
UNICODE = b"UNICODE\x00"  # piexif.helper.UserComment's prefix for encoding="unicode"
JPEG_EXIF_MAX = 65533  # a JPEG marker segment's payload: PIL refuses a longer EXIF block


@dataclass(frozen=True)
class Encoding:
    """The returned images' format (``png``, ``jpeg`` or ``webp``), JPEG / WebP quality, WebP lossless."""

    format: str = "png"
    quality: int = 80
    lossless: bool = False

    @property
    def pil_format(self) -> str:
        return {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[self.format]


def encoding(options: Mapping[str, Any]) -> Encoding:
    """The encoding the (already checked) options ask for; missing ones take A1111's defaults."""
    opts = {**DEFAULTS, **{k: v for k, v in options.items() if k in DEFAULTS and v is not None}}
    fmt = str(opts["samples_format"]).strip().lower()
    return Encoding("jpeg" if fmt == "jpg" else fmt, int(opts["jpeg_quality"]), bool(opts["webp_lossless"]))


def user_comment(text: str) -> bytes:
    """An EXIF block holding only ``text`` as A1111's UserComment, laid out as ``piexif.dump`` lays
    it out: big-endian TIFF, IFD0 with the Exif IFD pointer, the Exif IFD with tag 0x9286 of type
    UNDEFINED (7). (PIL's ``Image.Exif`` writes that tag as BYTE, which piexif, and so A1111's
    ``read_info_from_image``, cannot read back.)"""
    data = UNICODE + text.encode("utf-16-be")
    exif_ifd = 8 + 18  # the TIFF header, then IFD0: a count, one 12-byte entry, the next-IFD offset
    ifd0 = struct.pack(">HHHII I", 1, EXIF_IFD, 4, 1, exif_ifd, 0)
    exif = struct.pack(">HHHII", 1, USER_COMMENT, 7, len(data), exif_ifd + 14)  # piexif: no next offset
    return b"Exif\x00\x00" + b"MM\x00\x2a" + struct.pack(">I", 8) + ifd0 + exif + data


def exif_args(text: str | None, fmt: str) -> dict[str, bytes]:
    """``save``'s ``exif`` keyword carrying ``text`` for a JPEG / WebP, or nothing: no text, or a JPEG
    it does not fit (an OpenAI prompt of 32,000 characters is 64 KB in UTF-16): the image goes out
    without its parameters rather than failing the request."""
    if not text:
        return {}
    block = user_comment(text)
    if fmt == "jpeg" and len(block) > JPEG_EXIF_MAX:
        return {}
    return {"exif": block}


def encode(img: Image.Image, params: dict[str, Any], text: str, enc: Encoding) -> bytes:
    """One returned image: PNG with A1111's infotext and our JSON chunk, else JPEG / WebP with the
    infotext in EXIF UserComment (our JSON has no place there; A1111 writes only the infotext)."""
    if enc.format == "png":
        return png_bytes(img, params, text)
    if img.mode != "RGB":  # A1111 converts RGBA (JPEG has no alpha)
        img = img.convert("RGB")
    buf = io.BytesIO()
    extra = {"lossless": enc.lossless} if enc.format == "webp" else {}
    img.save(buf, format=enc.pil_format, quality=enc.quality, **exif_args(text, enc.format), **extra)
    return buf.getvalue()

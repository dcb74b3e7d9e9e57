"""The one gate for images that come in: every route that takes an image (our ``init_image`` /
``mask``, A1111 ``init_images`` / ``mask`` and png-info, OpenAI's ``image`` / ``mask`` uploads)
reads it here and nowhere else.

In order, each step bounded before the next costs anything:

1. text: an optional ``data:image/...;base64,`` prefix is dropped, the length is checked
   (:data:`MAX_B64_CHARS`) and only then is base64 decoded;
2. bytes: the first bytes must be PNG, JPEG or WebP; a JPEG's scans are counted (each decodes the
   whole image again) and at most :data:`MAX_JPEG_SCANS` pass;
3. header: PIL's lazy open reads the header (for PNG also the text chunks before the pixels, each
   bounded below) and the size is checked against the pixel limit, so a decompression bomb (a
   few hundred KB that decode to gigabytes) is refused without decoding a pixel; animated images
   are refused;
4. pixels: decoded only now, and a truncated or corrupt file is refused.

Every refusal is an :class:`ImageInputError` naming the request field; each API renders it in its
own error shape (a 4xx). No other exception leaves the gate.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, ImageOps, PngImagePlugin
from torch import Tensor

# KDIFF_MAX_IMAGE_PIXELS (settings) sets it at app start; 4096 x 4096 takes a 12 MP phone photo.
DEFAULT_MAX_PIXELS = 4096 * 4096
# The longest base64 text taken (16 MB as the request schemas' image fields); checked before decoding.
MAX_B64_CHARS = 16_000_000
# The largest raw file (an OpenAI multipart upload); base64 text is bounded by MAX_B64_CHARS above.
MAX_FILE_BYTES = 16 * 2**20
# PNG text chunks: each at most 1 MiB once decompressed (a ComfyUI workflow fits), all of them 4 MiB.
# PIL's own defaults are 1 MiB and 64 MiB; a zTXt bomb is a few KB per MiB, so the total matters.
MAX_TEXT_CHUNK = 2**20
MAX_TEXT_TOTAL = 4 * 2**20
PngImagePlugin.MAX_TEXT_CHUNK = MAX_TEXT_CHUNK
PngImagePlugin.MAX_TEXT_MEMORY = MAX_TEXT_TOTAL

# A progressive JPEG decodes every scan over the whole image: a 4096 x 4096 one with its last scan
# repeated costs ~6 ms of CPU a scan for ~33 bytes of file (libjpeg-turbo's TJPARAM_SCANLIMIT
# exists for this). Encoders write up to ~20 scans (libjpeg 10, mozjpeg's optimised sets a few
# more); headers before the first scan are a few dozen segments.
MAX_JPEG_SCANS = 100
MAX_JPEG_SEGMENTS = 4096
FORMATS = ("PNG", "JPEG", "WebP")
_PIL_FORMATS = {"PNG": ["PNG"], "JPEG": ["JPEG", "MPO"], "WebP": ["WEBP"]}
_B64_SLICE = 2**18  # characters of base64 decoded per call (a multiple of 4)
_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+)?((?:;[\w.+-]+=[\w.+-]+)*)(;base64)?,", re.ASCII)

_max_pixels = DEFAULT_MAX_PIXELS


class ImageInputError(ValueError):
    """An image a request field cannot take: ``field`` names it, ``message`` says why."""

    def __init__(self, field: str, message: str, allowed: list[Any] | None = None) -> None:
        super().__init__(message)
        self.field, self.message, self.allowed = field, message, allowed


def set_max_pixels(pixels: int) -> None:
    """The pixel limit for every route (the app sets it from ``KDIFF_MAX_IMAGE_PIXELS``)."""
    global _max_pixels
    _max_pixels = int(pixels)


@dataclass(frozen=True, eq=False)
class GatedImage:
    """An image that passed the gate (pixels decoded, one frame, within the limit). A translator
    hands it to our request schema in place of base64 text, so nothing is encoded twice."""

    image: Image.Image
    field: str


def strip_data_url(text: str, field: str) -> str:
    """The base64 part of a ``data:`` URL (the text itself when it is not one)."""
    if not text.startswith("data:"):
        return text
    m = _DATA_URL.match(text[:512])
    if m is None or m.group(3) is None:
        raise ImageInputError(field, f"{field}: a data URL must be data:image/<type>;base64,<data>")
    if m.group(1) and not m.group(1).lower().startswith(("image/", "application/octet-stream")):
        raise ImageInputError(field, f"{field}: a data URL of type {m.group(1)} is not an image")
    return text[m.end() :]


def b64_bytes(text: str, field: str, max_chars: int = MAX_B64_CHARS) -> bytes:
    """Base64 text (or a data URL) -> bytes; its length is checked before anything is decoded."""
    if not isinstance(text, str):
        raise ImageInputError(field, f"{field}: expected base64 text, got {type(text).__name__}")
    if len(text) > max_chars + 512:  # the slack: a data URL's prefix
        raise ImageInputError(field, f"{field}: {len(text)} characters of base64; at most {max_chars}")
    data = strip_data_url(text, field)
    if len(data) > max_chars:
        raise ImageInputError(field, f"{field}: {len(data)} characters of base64; at most {max_chars}")
    try:
        return _decode(data)
    except (binascii.Error, ValueError):
        pass
    # Tools that wrap base64 lines (the `base64` CLI, MIME) send newlines: drop ASCII whitespace only,
    # as bytes (a regex over 16 MB of "A " held the GIL for half a second; this takes ~15 ms)
    try:
        compact = data.encode("ascii").translate(None, b" \t\r\n").decode("ascii")
    except UnicodeEncodeError as exc:
        raise ImageInputError(field, f"{field}: not valid base64 (non-ASCII characters)") from exc
    try:
        return _decode(compact)
    except (binascii.Error, ValueError) as exc:
        raise ImageInputError(field, f"{field}: not valid base64 ({exc})") from exc


def _decode(data: str) -> bytes:
    """Strict base64, a slice at a time: one call holds the GIL throughout (16 MB: ~100 ms on a busy
    machine), so even in a worker thread it would stall the event loop; between slices it is free."""
    if len(data) <= _B64_SLICE:
        return base64.b64decode(data, validate=True)
    if data.find("=", 0, len(data) - 2) >= 0:  # padding inside: a slice boundary must not accept it
        raise ValueError("padding before the end")
    return b"".join(
        base64.b64decode(data[i : i + _B64_SLICE], validate=True) for i in range(0, len(data), _B64_SLICE)
    )


def sniff(raw: bytes) -> str | None:
    """The format by its signature: PNG, JPEG, WebP, else None."""
    if raw.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if raw.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "WebP"
    return None


def jpeg_scans(raw: bytes) -> int:
    """How many scans (SOS markers) a JPEG holds; -1 if its header has over MAX_JPEG_SEGMENTS segments.

    Segments before the first scan are skipped by their lengths (an EXIF thumbnail or an ICC profile
    may hold the bytes FF DA); after it, entropy-coded data stuffs every FF with 00, so FF DA there
    is a marker. A file that breaks the marker structure counts 0: the decoder names the fault."""
    pos, end = 2, len(raw)
    for _ in range(MAX_JPEG_SEGMENTS):
        if pos + 4 > end or raw[pos] != 0xFF:
            return 0
        marker = raw[pos + 1]
        if marker == 0xFF:  # a fill byte before a marker
            pos += 1
        elif marker == 0xDA:
            return 1 + raw.count(b"\xff\xda", pos + 2)
        elif 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
            pos += 2
        else:
            pos += 2 + int.from_bytes(raw[pos + 2 : pos + 4], "big")
    return -1


def _check_jpeg_scans(raw: bytes, field: str) -> None:
    scans = jpeg_scans(raw)
    if scans < 0:
        raise ImageInputError(field, f"{field}: a JPEG header of over {MAX_JPEG_SEGMENTS} segments")
    if scans > MAX_JPEG_SCANS:
        raise ImageInputError(
            field, f"{field}: a JPEG of {scans} scans; at most {MAX_JPEG_SCANS}", [1, MAX_JPEG_SCANS]
        )


def _bytes_of(data: str | bytes, field: str) -> bytes:
    if isinstance(data, bytes | bytearray):
        if len(data) > MAX_FILE_BYTES:
            raise ImageInputError(field, f"{field}: {len(data)} bytes; at most {MAX_FILE_BYTES}")
        return bytes(data)
    return b64_bytes(data, field)


def open_header(data: str | bytes, field: str, limit: int | None = None) -> Image.Image:
    """The image opened lazily: header (and a PNG's leading text chunks) read, size checked, no pixel
    decoded. ``data``: base64 text / a data URL, or the file's bytes."""
    limit = _max_pixels if limit is None else limit
    raw = _bytes_of(data, field)
    kind = sniff(raw)
    if kind is None:
        start = f", starting {raw[:8].hex(' ')}" if raw else ""
        raise ImageInputError(
            field, f"{field}: not a PNG, JPEG or WebP image ({len(raw)} bytes{start})", list(FORMATS)
        )
    if kind == "JPEG":
        _check_jpeg_scans(raw, field)
    try:
        img = Image.open(io.BytesIO(raw), formats=_PIL_FORMATS[kind])
    except Image.DecompressionBombError as exc:  # PIL's own cap (2 x Image.MAX_IMAGE_PIXELS) came first
        raise ImageInputError(field, f"{field}: larger than {limit} pixels ({exc})") from exc
    except ValueError as exc:  # PIL's text chunk limits, set above
        raise ImageInputError(
            field,
            f"{field}: its text chunks are too large (at most {MAX_TEXT_CHUNK} bytes each, "
            f"{MAX_TEXT_TOTAL} in all once decompressed): {exc}",
        ) from exc
    except Exception as exc:  # corrupt headers raise anything from OSError to struct.error
        raise ImageInputError(field, f"{field}: not a readable {kind} image ({_why(exc)})") from exc
    w, h = img.size
    if w <= 0 or h <= 0 or w * h > limit:
        img.close()
        raise ImageInputError(
            field,
            f"{field}: {w}x{h} is {w * h} pixels; at most {limit} (KDIFF_MAX_IMAGE_PIXELS)",
            [1, limit],
        )
    # MPO (a camera JPEG with a second, preview or depth image) reads as its first image.
    if getattr(img, "is_animated", False) and img.format != "MPO":
        frames = getattr(img, "n_frames", "several")
        img.close()
        raise ImageInputError(field, f"{field}: an animated image ({frames} frames); send one still image")
    return img


def load(data: str | bytes | GatedImage, field: str, limit: int | None = None) -> GatedImage:
    """The image through the whole gate, pixels decoded (one frame). A :class:`GatedImage` passes."""
    if isinstance(data, GatedImage):
        return data
    img = open_header(data, field, limit)
    try:
        img.load()  # LOAD_TRUNCATED_IMAGES stays False: a cut-off file is an error, not grey pixels
        img = _eight_bit(img)
    except Exception as exc:
        raise ImageInputError(field, f"{field}: not a readable {img.format} image ({_why(exc)})") from exc
    return GatedImage(img, field)


ORIENTATION = 0x0112  # the EXIF tag of how a camera's stored pixels are turned


def upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation says: a phone photo is stored sideways with an
    orientation every viewer applies (OpenAI edits and ComfyUI's LoadImage turn it; A1111's API
    does not, so the gate leaves it to the caller)."""
    if img.getexif().get(ORIENTATION, 1) != 1:
        return ImageOps.exif_transpose(img)
    return img


def _eight_bit(img: Image.Image) -> Image.Image:
    """16-bit and float greyscale PNGs -> 8-bit L (PIL converts those to RGB poorly or not at all)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        return img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    if img.mode == "F":
        return img.point(lambda v: v * 255).convert("L")
    return img


def to_tensor(
    data: str | bytes | GatedImage, field: str, size: tuple[int, int] | None, channels: int
) -> Tensor:
    """An incoming image -> [1, C, H, W] in [-1, 1] (C = 1: greyscale, 3: RGB), resized to ``size``
    (h, w) unless None (then at its own size)."""
    img = load(data, field).image
    try:
        img = img.convert("L" if channels == 1 else "RGB")
        if size is not None and img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.Resampling.BICUBIC)
        buf = bytearray(img.tobytes())
    except Exception as exc:
        raise ImageInputError(field, f"{field}: not a readable image ({_why(exc)})") from exc
    # In place: a 16 MP RGB image is 200 MB as float32, and each out-of-place step would add another.
    t = torch.frombuffer(buf, dtype=torch.uint8).float().div_(127.5).sub_(1)
    del buf
    return t.view(img.height, img.width, channels).permute(2, 0, 1).unsqueeze(0)


def text_chunks(data: str | bytes, field: str, limit: int | None = None) -> dict[str, str]:
    """An image's text metadata without decoding its pixels: a PNG's text chunks before the image
    data (where PIL, A1111 and ComfyUI write them), a JPEG's or WebP's EXIF UserComment (where A1111
    writes its infotext for those) as ``parameters``."""
    img = open_header(data, field, limit)
    try:
        chunks = {str(k): v for k, v in img.info.items() if isinstance(v, str)}
        if img.format != "PNG" and "parameters" not in chunks:
            comment = _exif_user_comment(img)
            if comment:
                chunks["parameters"] = comment
        return chunks
    finally:
        img.close()


def _exif_user_comment(img: Image.Image) -> str | None:
    """EXIF UserComment (tag 0x9286 in the Exif IFD): an 8-byte charset id, then the text."""
    try:
        raw = img.getexif().get_ifd(0x8769).get(0x9286)
    except Exception:  # unreadable EXIF is no infotext, not an error
        return None
    if isinstance(raw, str):
        return raw.strip("\x00") or None
    if not isinstance(raw, bytes) or len(raw) < 8:
        return None
    head, body = raw[:8], raw[8:]
    if head.startswith(b"UNICODE"):  # A1111 (piexif) writes UTF-16, big-endian unless a BOM says
        enc = "utf-16" if body[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-16-be"
        text = body.decode(enc, errors="replace")
    else:
        text = body.decode("utf-8", errors="replace")
    return text.strip("\x00") or None


def _why(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."

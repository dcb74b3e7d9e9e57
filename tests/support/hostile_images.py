"""Hostile images, built the way attackers and broken tools make them: real encoders (PIL's PNG, JPEG
and WebP writers, zlib for PNG data and text chunks) and the chunk layout of the PNG specification.

- :func:`bomb_png`: a valid one-colour PNG whose IDAT is zlib-compressed zero rows: a few hundred KB
  that decode to ``w * h * 3`` bytes (the classic decompression bomb; PIL's own writer makes the same
  file, only slower);
- :func:`jpeg_claiming` / :func:`webp_claiming`: a real small JPEG / lossless WebP whose header
  claims a huge size (a decoder that trusts the header allocates it);
- :func:`ztxt_png`: a PNG with compressed text chunks (zTXt, or iTXt with the compression flag), as
  PIL writes them for ``PngInfo.add_text(..., zip=True)``;
- :func:`truncated`, :func:`animated_png`, :func:`animated_webp`, :func:`a1111_jpeg`.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib
from functools import lru_cache

from PIL import Image, PngImagePlugin

from service.api.compat.a1111_encode import user_comment

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@lru_cache(maxsize=4)  # a few seconds each on a slow machine; the tests only read them
def bomb_png(width: int, height: int, colour_type: int = 2) -> bytes:
    """A valid 8-bit PNG of one colour (black), ``colour_type`` 2 = RGB, 0 = greyscale."""
    channels = {0: 1, 2: 3}[colour_type]
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    row = b"\x00" * (1 + width * channels)  # filter byte 0 (None) + the pixels
    z = zlib.compressobj(9)
    parts = [z.compress(row) for _ in range(height)]
    parts.append(z.flush())
    return PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def small_png(size: tuple[int, int] = (16, 16), mode: str = "RGB", colour: object = None) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour if colour is not None else 128).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real 16x16 JPEG (PIL's encoder) whose SOF0 header says ``width`` x ``height``."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format="JPEG", quality=90)
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")  # baseline start-of-frame: length(2) precision(1) height(2) width(2)
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def webp_claiming(width: int, height: int) -> bytes:
    """A real 16x16 lossless WebP (PIL's encoder) whose VP8L header says ``width`` x ``height``
    (14 bits each, at most 16384)."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 10)).save(buf, format="WEBP", lossless=True)
    data = bytearray(buf.getvalue())
    at = data.index(b"VP8L") + 8  # chunk id, size (4), then the signature byte 0x2f
    assert data[at] == 0x2F
    bits = struct.unpack_from("<I", data, at + 1)[0]
    bits = (bits & ~0x0FFFFFFF) | ((width - 1) & 0x3FFF) | (((height - 1) & 0x3FFF) << 14)
    struct.pack_into("<I", data, at + 1, bits)
    return bytes(data)


def ztxt_png(texts: dict[str, str], itxt: bool = False) -> bytes:
    """A 1x1 PNG with each text compressed (zTXt, or iTXt with compression when ``itxt``), by PIL."""
    info = PngImagePlugin.PngInfo()
    for key, value in texts.items():
        if itxt:
            info.add_itxt(key, value, zip=True)
        else:
            info.add_text(key, value, zip=True)
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def raw_ztxt_png(chunks: list[tuple[str, bytes]]) -> bytes:
    """A 1x1 PNG with zTXt chunks holding the given (keyword, uncompressed text) pairs, each chunk
    written directly (PIL's reader limits are what is under test, so its writer is not needed)."""
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    out = [PNG_SIGNATURE, chunk(b"IHDR", ihdr)]
    for key, text in chunks:
        out.append(chunk(b"zTXt", key.encode("latin-1") + b"\x00\x00" + zlib.compress(text, 9)))
    out += [chunk(b"IDAT", zlib.compress(b"\x00\x00")), chunk(b"IEND", b"")]
    return b"".join(out)


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: int(len(data) * keep)]


def noisy(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A photo-like RGB image (noise over a gradient: compresses as badly as a real photo)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    w, h = size
    grad = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    arr = np.clip(grad + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def encoded(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def animated_png(frames: int = 3) -> bytes:
    imgs = [Image.new("RGB", (16, 16), (i * 40, 0, 0)) for i in range(frames)]
    return encoded(imgs[0], "PNG", save_all=True, append_images=imgs[1:], duration=100)


def animated_webp(frames: int = 3) -> bytes:
    imgs = [Image.new("RGB", (16, 16), (0, i * 40, 0)) for i in range(frames)]
    return encoded(imgs[0], "WEBP", save_all=True, append_images=imgs[1:], duration=100)


def a1111_jpeg(infotext: str, size: tuple[int, int] = (16, 16)) -> bytes:
    """A JPEG as A1111 saves one: the infotext in EXIF UserComment, b"UNICODE\\0" + UTF-16 big-endian
    (piexif's ``UserComment.dump(text, encoding="unicode")``), in the Exif IFD, the block laid out as
    ``piexif.dump`` lays it out (tests/api/compat/test_a1111_formats.py checks it byte for byte)."""
    return encoded(Image.new("RGB", size, (1, 2, 3)), "JPEG", exif=user_comment(infotext))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def jpeg_segments(data: bytes) -> list[tuple[int, bytes]]:
    """A JPEG cut into its marker segments (a scan with its entropy-coded data), as (marker, bytes)."""
    out, i = [], 2
    while i < len(data):
        marker = data[i + 1]
        if marker == 0xD9:
            out.append((marker, data[i : i + 2]))
            break
        j = i + 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == 0xDA:  # entropy-coded data runs to the next marker that is not FF00 or a restart
            while data[j] != 0xFF or data[j + 1] == 0 or 0xD0 <= data[j + 1] <= 0xD7:
                j += 1
        out.append((marker, data[i:j]))
        i = j
    return out


def many_scan_jpeg(scans: int, size: tuple[int, int] = (64, 64)) -> bytes:
    """A progressive JPEG whose last scan is repeated until it has ``scans`` scans: libjpeg decodes
    every one (a CPU bomb of a few bytes a scan)."""
    segs = jpeg_segments(encoded(Image.new("L", size, 128), "JPEG", progressive=True, quality=10))
    head = b"".join(s for m, s in segs if m not in (0xDA, 0xD9))
    sos = [s for m, s in segs if m == 0xDA]
    return b"\xff\xd8" + head + b"".join(sos) + sos[-1] * (scans - len(sos)) + b"\xff\xd9"

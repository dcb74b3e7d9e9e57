"""What ComfyUI's /view and /upload/mask do to an image (its public server.py): a preview in another
format (``preview=webp;90``), one channel (``channel=rgb`` / ``a``), and a mask's alpha put into the
original image. Each runs in a worker thread; the bytes are the caller's own stored files (uploads
passed the image gate when they came in, outputs are ours) or an upload gated by the route."""

from __future__ import annotations

import io

from PIL import Image, PngImagePlugin

PREVIEW_FORMATS = ("webp", "jpeg")


def view_variant(data: bytes, preview: str | None, channel: str | None) -> tuple[bytes, str] | None:
    """(bytes, format) of the file as ``/view`` asked for it; None: the file as it is."""
    channel = channel or ""  # ComfyUI: "" (the file as it is) unless given
    if preview is not None:
        parts = preview.split(";")
        fmt = parts[0] if parts[0] in PREVIEW_FORMATS and "a" not in channel else "webp"
        quality = min(100, int(parts[-1])) if parts[-1].isdigit() else 90
        with Image.open(io.BytesIO(data)) as img:
            out = img.convert("RGB") if fmt == "jpeg" or channel == "rgb" else img.convert("RGBA")
            return _save(out, fmt.upper(), quality=quality), fmt
    if channel == "rgb":
        with Image.open(io.BytesIO(data)) as img:
            return _save(img.convert("RGB"), "PNG"), "png"
    if channel == "a":
        with Image.open(io.BytesIO(data)) as img:
            alpha = img.getchannel("A") if "A" in img.getbands() else Image.new("L", img.size, 255)
            out = Image.new("RGBA", img.size)
            out.putalpha(alpha)
            return _save(out, "PNG"), "png"
    return None


def with_mask_alpha(original: bytes, mask: bytes) -> bytes:
    """ComfyUI's /upload/mask: the original as RGBA with the mask's alpha (its text chunks kept)."""
    with Image.open(io.BytesIO(original)) as img, Image.open(io.BytesIO(mask)) as m:
        info = PngImagePlugin.PngInfo()
        for key, value in getattr(img, "text", {}).items():
            info.add_text(key, value)
        rgba = img.convert("RGBA")
        alpha = m.convert("RGBA").getchannel("A")
        if alpha.size != rgba.size:
            raise ValueError(
                f"the mask is {alpha.size[0]}x{alpha.size[1]}, the image {rgba.size[0]}x{rgba.size[1]}"
            )
        rgba.putalpha(alpha)
        return _save(rgba, "PNG", pnginfo=info, compress_level=4)


def _save(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()

"""PNG encoding (with generation parameters in a text chunk) and grids. Images that come in are read
by :mod:`service.image_gate`."""

from __future__ import annotations

import base64
import io
import json
import math
from typing import Any

import torch
from PIL import Image, PngImagePlugin
from torch import Tensor

from service.infotext import from_parameters

PARAMETERS_KEY = "parameters"  # the tEXt key A1111 and Civitai read: A1111's infotext
KDIFF_KEY = "kdiff"  # our exact parameters as JSON (what reproduction reads)


def to_pil(image: Tensor) -> Image.Image:
    """[C, H, W] in [-1, 1] -> an 8-bit PIL image (L for 1 channel, RGB for 3)."""
    arr = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    if arr.shape[0] == 1:
        return Image.fromarray(arr[0].numpy(), mode="L")
    return Image.fromarray(arr[:3].permute(1, 2, 0).contiguous().numpy(), mode="RGB")


def png_bytes(
    img: Image.Image, parameters: dict[str, Any] | None = None, infotext: str | None = None
) -> bytes:
    """PNG with A1111's infotext (``infotext``, else written from ``parameters``) in the ``parameters``
    chunk and ``parameters`` as JSON in the ``kdiff`` chunk."""

    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text(PARAMETERS_KEY, infotext if infotext is not None else from_parameters(parameters))
        info.add_text(KDIFF_KEY, json.dumps(parameters, sort_keys=True, default=str))
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def encode_images(images: Tensor, parameters: dict[str, Any], seeds: list[int]) -> list[bytes]:
    """One PNG per image; each carries the request parameters with its own seed."""
    out = []
    for i, image in enumerate(images):
        params = {**parameters, "seed": seeds[i], "index": i}
        out.append(png_bytes(to_pil(image), params))
    return out


def grid_png(pngs: list[bytes], parameters: dict[str, Any]) -> bytes:
    """Tile PNGs (same size) into a near-square grid; one image is returned as is."""
    if len(pngs) == 1:
        return pngs[0]
    imgs = [Image.open(io.BytesIO(p)) for p in pngs]
    cols = math.ceil(math.sqrt(len(imgs)))
    rows = math.ceil(len(imgs) / cols)
    w, h = imgs[0].size
    grid = Image.new(imgs[0].mode, (cols * w, rows * h))
    for i, img in enumerate(imgs):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return png_bytes(grid, parameters)


def read_parameters(png: bytes) -> dict[str, Any]:
    """Our parameters from a PNG: the ``kdiff`` chunk (older PNGs: JSON in ``parameters``)."""
    img = Image.open(io.BytesIO(png))
    return dict(json.loads(img.info.get(KDIFF_KEY) or img.info[PARAMETERS_KEY]))


def preview_png(image: Tensor, max_side: int = 64) -> str:
    """A small base64 PNG of one image (for SSE previews)."""
    img = to_pil(image)
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side))
    return base64.b64encode(png_bytes(img)).decode()

"""cubiq's PrepImageForClipVision (ipadapter/utils): the reference image cut to a square and resized
to CLIP's 224 x 224 before an IPAdapter node, optionally sharpened, as its ``prep_image`` does (the
square at ``crop_position`` or the short side padded black; 8 bits by truncation, as torchvision's
ToPILImage; PIL's resampling; contrast-adaptive sharpening). Our encoder's own preprocessing then
leaves a 224 x 224 image as it is.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from . import nodes_ipadapter
from .node import DISPLAY_NAMES, Enum, Float, In, node
from .runtime import NodeRun

DISPLAY_NAMES["PrepImageForClipVision"] = "Prep Image For ClipVision"
IMAGE = In("IMAGE")

CLIP_SIDE = 224
INTERPOLATIONS = ("LANCZOS", "BICUBIC", "HAMMING", "BILINEAR", "BOX", "NEAREST")
CROPS = ("top", "bottom", "left", "right", "center", "pad")


def sharpen(x: Tensor, amount: float) -> Tensor:
    """Contrast-adaptive sharpening (AMD FidelityFX CAS, as cubiq applies it) of [B, C, H, W] in
    [0, 1]: each pixel's 4-neighbour weight -sqrt(min(lo, 2 - hi) / hi) * lerp(1/8, 1/5, amount), lo / hi
    the min / max over its 3x3 cross plus those over its corners; zero padding at the border."""
    h, w = x.shape[-2:]
    p = torch.nn.functional.pad(x, (1, 1, 1, 1))

    def at(dy: int, dx: int) -> Tensor:
        return p[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    sides = torch.stack([at(-1, 0), at(0, -1), at(0, 1), at(1, 0)])
    cross = torch.cat([sides, x[None]])
    corners = torch.stack([at(-1, -1), at(-1, 1), at(1, -1), at(1, 1)])
    lo = cross.amin(0) + corners.amin(0)
    hi = cross.amax(0) + corners.amax(0)
    weight = -torch.sqrt(torch.minimum(lo, 2 - hi) / hi) * (1 / 8 + amount * (1 / 5 - 1 / 8))
    out = (sides.sum(0) * weight + x) / (1 + 4 * weight)
    return torch.nan_to_num(out).clamp(0, 1)


def prep_for_clip(image: Tensor, interpolation: str, crop_position: str, sharpening: float) -> Tensor:
    """IMAGE [B, H, W, 3] -> [B, 224, 224, 3]: a square cut at ``crop_position`` (or the short side
    padded with black, "pad"), to 8 bits by truncation and resized by PIL, as cubiq's node does."""
    _, h, w, _ = image.shape
    x = image.permute(0, 3, 1, 2)
    if crop_position == "pad":
        extra = abs(h - w) // 2
        x = torch.nn.functional.pad(x, (extra, extra, 0, 0) if h > w else (0, 0, extra, extra))
    else:
        side = min(h, w)
        top = {"top": 0, "bottom": h - side}.get(crop_position, (h - side) // 2)
        left = {"left": 0, "right": w - side}.get(crop_position, (w - side) // 2)
        x = x[:, :, top : top + side, left : left + side]
    resample = Image.Resampling[interpolation]
    frames = []
    for frame in x:
        arr = frame.mul(255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()  # truncated, as ToPILImage
        pil = Image.fromarray(arr, mode="RGB").resize((CLIP_SIDE, CLIP_SIDE), resample=resample)
        frames.append(torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255).permute(2, 0, 1))
    out = torch.stack(frames)
    if sharpening > 0:
        out = sharpen(out, sharpening)
    return out.permute(0, 2, 3, 1).contiguous()


@nodes_ipadapter.cubiq_node
@node(
    "PrepImageForClipVision",
    "ipadapter/utils",
    ["IMAGE"],
    {
        "image": IMAGE,
        "interpolation": Enum(INTERPOLATIONS),
        "crop_position": Enum(CROPS),
        "sharpening": Float(0.0, 0.0, 1.0, 0.05),
    },
)
async def prep_image_for_clip_vision(rt: NodeRun, image: Tensor, **kw: Any) -> tuple[Any, ...]:
    """The reference image as CLIP sees it: a 224 x 224 square, optionally sharpened."""
    return (
        await asyncio.to_thread(
            prep_for_clip, image, kw["interpolation"], kw["crop_position"], kw["sharpening"]
        ),
    )

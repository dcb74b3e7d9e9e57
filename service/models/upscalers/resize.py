"""PIL's resampling filters on float tensors (A1111 resizes with PIL's Lanczos and Nearest): each
channel as a 32-bit float image (mode "F"), so there is no 8-bit rounding in between."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

LANCZOS = Image.Resampling.LANCZOS
NEAREST = Image.Resampling.NEAREST


def pil_resize(x: Tensor, size: tuple[int, int], resample: Image.Resampling = LANCZOS) -> Tensor:
    """[B, C, H, W] float -> [B, C, h, w] (``size`` = (h, w)) with PIL's filter, on x's device."""
    h, w = size
    if tuple(x.shape[-2:]) == (h, w):
        return x.float()
    src = x.detach().float().cpu().numpy()
    out = np.empty((*src.shape[:2], h, w), dtype=np.float32)
    for b in range(src.shape[0]):
        for c in range(src.shape[1]):
            img = Image.fromarray(np.ascontiguousarray(src[b, c]))  # float32 -> mode "F"
            out[b, c] = np.asarray(img.resize((w, h), resample=resample), dtype=np.float32)
    return torch.from_numpy(out).to(x.device)


def from_pil(img: Image.Image) -> Tensor:
    """An RGB PIL image -> [1, 3, H, W] float in 0..1 (what the upscaler networks take: RGB, as
    spandrel, ComfyUI and the models' own inference scripts feed them)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0).float().div_(255)


def to_pil(x: Tensor, rows: int = 256) -> Image.Image:
    """[1, 3, H, W] (or [3, H, W]) in 0..1 -> an RGB PIL image (rounded to 8 bits).

    Converted ``rows`` at a time: whole, each of clamp, scale and round held a float copy of the
    image (394 MB apiece for 5734 x 5734), so an extras upscale peaked at a gigabyte over its input."""
    t = x.reshape(-1, *x.shape[-3:])[0].detach()
    out = torch.empty(t.shape[1], t.shape[2], 3, dtype=torch.uint8)
    for i in range(0, t.shape[1], rows):
        part = t[:, i : i + rows].float().clamp(0, 1).mul_(255).round_()
        out[i : i + rows] = part.permute(1, 2, 0).to(torch.uint8).cpu()
    return Image.fromarray(out.numpy(), "RGB")

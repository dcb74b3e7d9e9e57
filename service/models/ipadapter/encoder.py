"""The CLIP image encoder of an IP-Adapter: the image as CLIP sees it, and its embedding.

Pixels as CLIP's image processor makes them (diffusers' IP-Adapter pipelines use
``CLIPImageProcessor(size=S, crop_size=S)``, S the encoder's ``image_size``): RGB, shortest side to S
(bicubic), centre crop S x S, scaled to [0, 1] and normalised with CLIP's mean and std. The network is
transformers' ``CLIPVisionModelWithProjection`` (a runtime dependency already, for CLIP text).
Plain adapters project the pooled, projected ``image_embeds``; plus adapters the penultimate hidden
states. The unconditional embedding (the CFG rows) is what the reference pipelines use: zeros for
plain adapters, the encoding of an all-zero (normalised) image for plus adapters.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .files import EncoderFolder

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(img: Image.Image, size: int) -> Tensor:
    """[1, 3, size, size] float32: CLIP's preprocessing of one image."""
    img = img.convert("RGB")
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=None)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    unit = np.asarray(img, dtype=np.float32)[top : top + size, left : left + size] * np.float32(1 / 255)
    normed = (unit - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(normed.transpose(2, 0, 1)))[None]


class ImageEncoder:
    def __init__(self, folder: EncoderFolder, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import CLIPVisionModelWithProjection

        self.folder = folder
        net: Any = CLIPVisionModelWithProjection.from_pretrained(str(folder.path), use_safetensors=True)
        self.net = net.to(device, dtype).eval()
        self.device, self.dtype = device, dtype

    def pixels(self, img: Image.Image) -> Tensor:
        return clip_pixels(img, self.folder.image_size)

    def embed(self, pixels: Tensor, kind: str) -> tuple[Tensor, Tensor]:
        """(the image's embedding, the unconditional one) for a ``kind`` ("plain" | "plus") adapter,
        from :meth:`pixels`."""
        pixels = pixels.to(self.device, self.dtype)
        with torch.inference_mode():
            if kind == "plain":
                cond = self.net(pixel_values=pixels).image_embeds
                return cond, torch.zeros_like(cond)
            both = torch.cat([pixels, torch.zeros_like(pixels)])
            hidden = self.net(pixel_values=both, output_hidden_states=True).hidden_states[-2]
            return hidden[:1], hidden[1:]

"""Progress previews: a small PNG of a running job's latest prediction of its first image.

Pixel models' predictions are images already. A latent model's (Stable Diffusion, SD3, Flux) is
decoded by its own VAE, from the latent downsized to at most PREVIEW_LATENT on a side (area
average), so a thumbnail costs a small fraction of the full decode; A1111's "Full" live preview
decodes the whole latent instead. A preview is made at most once per job and step, however many
clients poll for it.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor

from service.images import preview_png
from service.models.store import LoadedModel

PREVIEW_LATENT = 32  # latent pixels on the long side (256 image pixels for an 8x VAE)
CACHED = 64  # (job, progress mark, size) previews kept


class Previews:
    """Previews per (job id, progress mark (Progress.mark: step[, percent]), size), the newest kept."""

    def __init__(self) -> None:
        self._cache: OrderedDict[tuple[str | int, ...], str] = OrderedDict()

    def get(self, key: tuple[str | int, ...]) -> str | None:
        return self._cache.get(key)

    def put(self, key: tuple[str | int, ...], png: str) -> None:
        self._cache[key] = png
        while len(self._cache) > CACHED:
            self._cache.popitem(last=False)


@torch.inference_mode()
def render(model: LoadedModel, latest: Tensor, max_side: int) -> str:
    """A base64 PNG (at most ``max_side`` pixels on a side) of ``latest`` (one image or latent)."""
    if model.decode is None:
        return preview_png(latest, max_side)
    z = latest[None].float()
    h, w = z.shape[-2:]
    scale = PREVIEW_LATENT / max(h, w)
    if scale < 1:
        z = F.interpolate(z, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="area")
    return preview_png(model.decode(z)[0].float().cpu(), max_side)


@torch.inference_mode()
def decode_full(model: LoadedModel, latest: Tensor) -> Tensor:
    """``latest`` (one image or latent) as a full-size image in [-1, 1] (a latent model's whole
    latent decoded, A1111's "Full" preview): OpenAI's partial images are the final image's size."""
    if model.decode is None:
        return latest.float().cpu()
    return model.decode(latest[None].float())[0].float().cpu()

"""Progress previews: a small PNG of a running job's latest prediction of its first image.

Pixel models' predictions are images already. A latent model's (Stable Diffusion, SD3, Flux) is
decoded by its own VAE, from the latent downsized to at most PREVIEW_LATENT on a side (area
average), so a thumbnail costs a small fraction of the full decode; A1111's "Full" live preview
decodes the whole latent instead. A preview is made at most once per job and step, however many
clients poll for it, at once or one after another.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from service.images import preview_png
from service.models.store import LoadedModel

PREVIEW_LATENT = 32  # latent pixels on the long side (256 image pixels for an 8x VAE)
CACHED = 64  # (job, progress mark, size) previews kept


Key = tuple[str | int, ...]


class Previews:
    """Previews per (job id, progress mark (Progress.mark: step[, percent]), size), the newest kept."""

    def __init__(self) -> None:
        self._cache: OrderedDict[Key, str] = OrderedDict()
        self._making: dict[Key, asyncio.Future[str]] = {}

    def get(self, key: Key) -> str | None:
        return self._cache.get(key)

    def put(self, key: Key, png: str) -> None:
        self._cache[key] = png
        while len(self._cache) > CACHED:
            self._cache.popitem(last=False)

    async def made(self, key: Key, make: Callable[[], str]) -> str:
        """The preview under ``key``, ``make`` run in a worker thread once for every caller that
        asks while it runs: hundreds of SSE subscribers on one job all ask at each step, and a
        render each (a VAE decode on latent models) filled the thread pool others need."""
        png = self._cache.get(key)
        if png is not None:
            return png
        making = self._making.get(key)
        if making is None:
            making = self._making[key] = asyncio.ensure_future(asyncio.to_thread(make))
            making.add_done_callback(lambda done: self._made(key, done))
        # shielded: a caller that goes away (its client disconnected) leaves the render to the others
        return await asyncio.shield(making)

    def _made(self, key: Key, done: asyncio.Future[str]) -> None:
        del self._making[key]
        if not done.cancelled() and done.exception() is None:  # a failure: the next caller tries again
            self.put(key, done.result())


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

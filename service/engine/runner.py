"""The model runner: what the engine needs from a loaded model, and the batched denoiser call."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class ModelHandle:
    """A denoiser model as the engine sees it: ``denoiser(x, sigma[B], **cond) -> denoised``.

    ``latent_shape`` is the per-image shape the sampler works in; ``decode`` (optional) turns
    sampled latents into images in [-1, 1] (a VAE for latent models; None for pixel models).
    """

    name: str
    denoiser: Any
    latent_shape: tuple[int, ...]
    device: torch.device
    dtype: torch.dtype
    decode: Callable[[Tensor], Tensor] | None = None


class ModelRunner:
    """Runs the denoiser on packed rows (no grad), chunking calls above ``max_rows``."""

    def __init__(self, handle: ModelHandle, max_rows: int) -> None:
        self.handle, self.max_rows = handle, max_rows

    @torch.inference_mode()
    def denoise(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor]) -> Tensor:
        b = x.shape[0]
        if b <= self.max_rows:
            return self.handle.denoiser(x, sigma, **cond)  # type: ignore[no-any-return]
        outs = []
        for i in range(0, b, self.max_rows):
            part = slice(i, i + self.max_rows)
            outs.append(self.handle.denoiser(x[part], sigma[part], **{k: v[part] for k, v in cond.items()}))
        return torch.cat(outs)

    @torch.inference_mode()
    def decode(self, latents: Tensor) -> Tensor:
        images = latents if self.handle.decode is None else self.handle.decode(latents)
        return images.detach().float().cpu()

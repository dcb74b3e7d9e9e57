"""Sample grids (PNG) from a UNet: one row per class for class-conditional models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from service.models.unet import UNetConfig


def to_grid(images: Tensor, nrow: int, pad: int = 1) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> uint8 [rows*(H+pad), nrow*(W+pad), C] image array."""
    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    grid = np.zeros([rows * (h + pad) + pad, nrow * (w + pad) + pad, c], dtype=np.uint8)
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[
            pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w
        ] = arr[i]
    return grid


def save_grid(images: Tensor, path: Path, nrow: int, scale: int = 4) -> Path:
    from PIL import Image

    grid = to_grid(images, nrow)
    im = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


@torch.no_grad()
def sample_grid(
    inner: nn.Module, config: UNetConfig, path: Path, steps: int = 20, seed: int = 0, per_class: int = 8
) -> Path:
    """Sample with dpmpp_2m + karras at ``steps`` NFE and write a grid (a row per class)."""
    from service.sampling.denoisers import KarrasDenoiser
    from service.sampling.ksampler import KSampler

    was_training = inner.training
    inner.eval()
    den = KarrasDenoiser(inner, config.sigma_data, sigma_min=config.sigma_min, sigma_max=config.sigma_max)
    den.num_classes = config.num_classes  # type: ignore[assignment]
    rows = max(1, config.num_classes)
    n = rows * per_class
    cond = {"class_cond": torch.arange(n) // per_class} if config.num_classes else None
    device = next(inner.parameters()).device
    if cond:
        cond = {k: v.to(device) for k, v in cond.items()}
    shape = (n, config.in_channels, config.image_size, config.image_size)
    x = KSampler(den).sample(
        shape=shape, steps=steps, seed=[seed + i for i in range(n)], condition=cond, device=device
    )
    inner.train(was_training)
    return save_grid(x, path, nrow=per_class)

"""Augmentations: flips, the Karras (EDM) geometric augmentation pipeline with its aug_cond vector,
and random rectangular masks. All draw from an explicit generator so training resumes exactly."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from service.models.unet import AUG_COND_DIM


def random_hflip(x: Tensor, gen: torch.Generator, p: float = 0.5) -> Tensor:
    flip = torch.rand([x.shape[0]], generator=gen) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def karras_augment(x: Tensor, gen: torch.Generator, p: float = 0.12) -> tuple[Tensor, Tensor]:
    """Random flip, integer translation, isotropic/anisotropic scaling, rotation, fractional
    translation, each applied per image with probability ``p``; returns (images, aug_cond [B, 9]).

    The model sees aug_cond so it can learn the augmented distribution separately and be
    sampled with aug_cond = 0 (no augmentation), as in Karras et al. 2022 (EDM), appendix.
    """
    b = x.shape[0]

    def draw(shape: list[int]) -> Tensor:
        return torch.rand(shape, generator=gen)

    def on() -> Tensor:
        return (draw([b]) < p).float()

    flip = on() * (draw([b]) < 0.5).float()
    size = x.shape[-1]
    # Integer translation of up to 1/8 of the image, in whole pixels (normalised coords span 2).
    int_t = on()[:, None] * ((draw([b, 2]) * 2 - 1) * 0.125 * size).round() * 2 / size
    log_s = on() * torch.randn([b], generator=gen) * 0.2 * math.log(2)
    rot = on() * (draw([b]) * 2 - 1) * math.pi
    log_aniso = on() * torch.randn([b], generator=gen) * 0.2 * math.log(2)
    frac_t = on()[:, None] * torch.randn([b, 2], generator=gen) * 0.125 * 2
    s = log_s.exp()
    sx, sy = s * log_aniso.exp() * (1 - 2 * flip), s * (-log_aniso).exp()
    cos, sin = rot.cos(), rot.sin()
    # Affine map in normalised coords: output pixel -> input pixel (grid_sample convention).
    theta = torch.stack(
        [
            torch.stack([cos / sx, -sin / sx, int_t[:, 0] + frac_t[:, 0]], -1),
            torch.stack([sin / sy, cos / sy, int_t[:, 1] + frac_t[:, 1]], -1),
        ],
        1,
    ).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    cond = torch.stack(
        [
            flip,
            int_t[:, 0],
            int_t[:, 1],
            log_s,
            rot.sin(),
            rot.cos() - 1,
            log_aniso,
            frac_t[:, 0],
            frac_t[:, 1],
        ],
        -1,
    )
    assert cond.shape[1] == AUG_COND_DIM
    return out, cond.to(x)


def random_masks(
    n: int, size: int, gen: torch.Generator, min_frac: float = 0.25, max_frac: float = 0.75
) -> Tensor:
    """Binary masks [n, 1, size, size] with one random rectangle of ones each (1 = region to fill)."""
    masks = torch.zeros([n, 1, size, size])
    for i in range(n):
        hw = (torch.rand([2], generator=gen) * (max_frac - min_frac) + min_frac) * size
        h, w = max(1, int(hw[0])), max(1, int(hw[1]))
        top = int(torch.randint(0, size - h + 1, [1], generator=gen))
        left = int(torch.randint(0, size - w + 1, [1], generator=gen))
        masks[i, :, top : top + h, left : left + w] = 1
    return masks

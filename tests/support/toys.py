"""Toy denoisers for sampler tests: cheap, nonlinear and row-independent."""

from __future__ import annotations

from typing import Any

import torch


def toy_image_model(x: torch.Tensor, sigma: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """A cheap nonlinear, row-independent stand-in for an image denoiser."""
    s = sigma.view(-1, *([1] * (x.ndim - 1)))
    return x / (1 + s**2) + 0.1 * torch.tanh(x) * s / (1 + s)


class Toy:
    """Row-independent toy denoiser with the attributes KSampler expects; counts calls."""

    sigma_min, sigma_max = 0.03, 14.6

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kw: Any) -> torch.Tensor:
        self.calls += 1
        return toy_image_model(x, sigma)

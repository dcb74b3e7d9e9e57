from __future__ import annotations

import types

import pytest
import torch

from tests.oracle import load
from tests.sampling.gmm import GMMDenoiser


@pytest.fixture(scope="session")
def kd() -> types.SimpleNamespace:
    """k-diffusion 0.1.1.post1 (the oracle); a missing oracle is an error, not a skip."""
    return load()


@pytest.fixture(scope="session")
def gmm() -> GMMDenoiser:
    return GMMDenoiser()


def toy_image_model(x: torch.Tensor, sigma: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """A cheap nonlinear, row-independent stand-in for an image denoiser."""
    s = sigma.view(-1, *([1] * (x.ndim - 1)))
    return x / (1 + s**2) + 0.1 * torch.tanh(x) * s / (1 + s)

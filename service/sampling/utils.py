"""Small tensor helpers with k-diffusion's names and semantics."""

from __future__ import annotations

import torch
from torch import Tensor


def append_dims(x: Tensor, target_dims: int) -> Tensor:
    """Append trailing singleton dims to ``x`` until it has ``target_dims`` dims."""
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * dims_to_append]


def append_zero(x: Tensor) -> Tensor:
    """Append a final 0 to a 1-D sigma schedule."""
    return torch.cat([x, x.new_zeros([1])])


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """Karras ODE derivative dx/dsigma = (x - D(x; sigma)) / sigma."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def get_ancestral_step(sigma_from: Tensor, sigma_to: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """Split a step into a deterministic step down to sigma_down and added noise of std sigma_up."""
    if not eta:
        return sigma_to, torch.zeros_like(torch.as_tensor(sigma_to))
    sigma_up = torch.minimum(
        torch.as_tensor(sigma_to),
        eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5,
    )
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up

"""Variation seeds (A1111's subseed / subseed_strength): per image, the start noise of its seed
spherically interpolated towards the noise of its subseed.

``strength`` 0 is the seed's noise, 1 the subseed's; values between walk along the great circle
between the two, so the result keeps (about) unit variance, as A1111's ``slerp`` does. Norms are
taken along dim 1 of each image's [C, H, W] noise (A1111 calls its slerp on such tensors).
"""

from __future__ import annotations

import torch
from torch import Tensor


def slerp(strength: float, low: Tensor, high: Tensor) -> Tensor:
    """Spherical interpolation of one image's noise ``low`` ([C, H, W]) towards ``high``."""
    low_n = low / torch.norm(low, dim=1, keepdim=True)
    high_n = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_n * high_n).sum(1)
    if float(dot.mean()) > 0.9995:  # (nearly) parallel: the straight line is as good and stable
        return low * (1.0 - strength) + high * strength
    omega = torch.acos(dot.clamp(-1.0, 1.0))
    so = torch.sin(omega)
    a = (torch.sin((1.0 - strength) * omega) / so).unsqueeze(1)
    b = (torch.sin(strength * omega) / so).unsqueeze(1)
    return a * low + b * high


def mix(noise: Tensor, subnoise: Tensor, strength: float) -> Tensor:
    """Batch [B, C, H, W] of seed noises, each moved ``strength`` towards its subseed noise."""
    if strength <= 0.0:
        return noise
    return torch.stack([slerp(strength, n, s) for n, s in zip(noise, subnoise, strict=True)])

"""The velocity networks of SD3 and Flux as ``v(x, t, **cond)`` for the FlowDenoiser.

``x`` is the latent [B, C, h, w] in the sampler's dtype, ``t`` [B] the flow time in [0, 1].
SD3's MMDiT takes the timestep as 1000 t; Flux's transformer takes t itself, the latent packed
in 2x2 patches ([B, h/2 * w/2, 4C]) with their (0, row, column) ids, and for Flux-dev the
distilled guidance scale per row (``guidance`` [B]).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class SD3Velocity(nn.Module):
    def __init__(self, transformer: Any) -> None:
        super().__init__()
        self.transformer = transformer
        self.dtype = next(transformer.parameters()).dtype

    def forward(self, x: Tensor, t: Tensor, *, context: Tensor, pooled: Tensor) -> Tensor:
        out = self.transformer(
            hidden_states=x.to(self.dtype),
            timestep=(t * 1000).to(self.dtype),
            encoder_hidden_states=context.to(self.dtype),
            pooled_projections=pooled.to(self.dtype),
            return_dict=False,
        )[0]
        return out.to(x.dtype)


def pack(x: Tensor) -> Tensor:
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: Tensor, h: int, w: int) -> Tensor:
    b, _, c4 = x.shape
    return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxVelocity(nn.Module):
    def __init__(self, transformer: Any) -> None:
        super().__init__()
        self.transformer = transformer
        self.dtype = next(transformer.parameters()).dtype
        self.guided = bool(transformer.config.guidance_embeds)

    def forward(
        self, x: Tensor, t: Tensor, *, context: Tensor, pooled: Tensor, guidance: Tensor | None = None
    ) -> Tensor:
        h, w = x.shape[-2:]
        out = self.transformer(
            hidden_states=pack(x).to(self.dtype),
            timestep=t.to(self.dtype),
            guidance=guidance.float() if self.guided and guidance is not None else None,
            pooled_projections=pooled.to(self.dtype),
            encoder_hidden_states=context.to(self.dtype),
            txt_ids=torch.zeros(context.shape[1], 3, device=x.device, dtype=self.dtype),
            img_ids=image_ids(h, w, x.device, self.dtype),
            return_dict=False,
        )[0]
        return unpack(out.to(x.dtype), h, w)

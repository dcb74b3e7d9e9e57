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

from service.models.stepcache.dit import block_count, flux_forward, sd3_forward
from service.models.stepcache.state import live


class Velocity(nn.Module):
    """A transformer as ``v(x, t, context=, pooled=, **family inputs, cache=None)``: the family makes
    the transformer's keyword arguments (``inputs``) and reads its output (``output``); rows with a
    step cache run ``cached`` (models/stepcache/dit.py: First-Block-Cache) instead of its forward."""

    cached: Any = None  # flux_forward / sd3_forward

    def __init__(self, transformer: Any) -> None:
        super().__init__()
        self.transformer = transformer
        self.dtype = next(transformer.parameters()).dtype

    def forward(
        self, x: Tensor, t: Tensor, *, context: Tensor, pooled: Tensor, **extra: Tensor | None
    ) -> Tensor:
        cache = extra.pop("cache", None)
        kw = self.inputs(x, t, context, pooled, **extra)
        if live(cache):
            out = type(self).cached(self.transformer, cache, **kw)
        else:
            out = self.transformer(**kw, return_dict=False)[0]
        return self.output(out.to(x.dtype), x)

    def inputs(self, x: Tensor, t: Tensor, context: Tensor, pooled: Tensor) -> dict[str, Any]:
        raise NotImplementedError

    def output(self, out: Tensor, x: Tensor) -> Tensor:
        return out

    def cache_methods(self) -> tuple[str, ...]:
        return ("fbcache",) if block_count(self.transformer) > 1 else ()


class SD3Velocity(Velocity):
    cached = staticmethod(sd3_forward)

    def inputs(self, x: Tensor, t: Tensor, context: Tensor, pooled: Tensor) -> dict[str, Any]:
        return {
            "hidden_states": x.to(self.dtype),
            "timestep": (t * 1000).to(self.dtype),
            "encoder_hidden_states": context.to(self.dtype),
            "pooled_projections": pooled.to(self.dtype),
        }


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


class FluxVelocity(Velocity):
    cached = staticmethod(flux_forward)

    def __init__(self, transformer: Any) -> None:
        super().__init__(transformer)
        self.guided = bool(transformer.config.guidance_embeds)

    def inputs(  # type: ignore[override]  # Flux-dev adds its distilled guidance
        self, x: Tensor, t: Tensor, context: Tensor, pooled: Tensor, guidance: Tensor | None = None
    ) -> dict[str, Any]:
        h, w = x.shape[-2:]
        return {
            "hidden_states": pack(x).to(self.dtype),
            "timestep": t.to(self.dtype),
            "guidance": guidance.float() if self.guided and guidance is not None else None,
            "pooled_projections": pooled.to(self.dtype),
            "encoder_hidden_states": context.to(self.dtype),
            "txt_ids": torch.zeros(context.shape[1], 3, device=x.device, dtype=self.dtype),
            "img_ids": image_ids(h, w, x.device, self.dtype),
        }

    def output(self, out: Tensor, x: Tensor) -> Tensor:
        return unpack(out, *x.shape[-2:])

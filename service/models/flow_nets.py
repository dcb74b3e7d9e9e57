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
        return self.output(self.run(kw, cache).to(x.dtype), x)

    def run(self, kw: dict[str, Any], cache: Tensor | None) -> Tensor:
        """The transformer's output for its inputs ``kw`` (rows with a live step cache: ``cached``)."""
        if live(cache):
            return type(self).cached(self.transformer, cache, **kw)  # type: ignore[no-any-return]
        return self.transformer(**kw, return_dict=False)[0]  # type: ignore[no-any-return]

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
    """Flux's transformer; with ``controls`` (a FluxControlSet: the store has ControlNets) each row's
    ControlNet residuals (controlnet/flux_units.py) are added after the transformer's blocks."""

    cached = staticmethod(flux_forward)
    controls: Any = None

    def __init__(self, transformer: Any) -> None:
        super().__init__(transformer)
        self.guided = bool(transformer.config.guidance_embeds)

    def forward(
        self, x: Tensor, t: Tensor, *, context: Tensor, pooled: Tensor, **extra: Tensor | None
    ) -> Tensor:
        latent, unit = extra.pop("control_latent", None), extra.pop("control_unit", None)
        region = extra.pop("control_region", None)
        if self.controls is None or latent is None or unit is None:
            return super().forward(x, t, context=context, pooled=pooled, **extra)
        cache = extra.pop("cache", None)
        kw = self.inputs(x, t, context, pooled, **extra)
        res = self.controls.residuals(kw, latent, unit, region)
        if res is None:
            return self.output(self.run(kw, cache).to(x.dtype), x)
        control = {"controlnet_block_samples": res[0], "controlnet_single_block_samples": res[1]}
        if not live(cache):
            return self.output(self.transformer(**kw, **control, return_dict=False)[0].to(x.dtype), x)
        # rows with a step cache have no ControlNet unit (a request cannot ask for both): they run
        # the cached forward, the others the plain one with their residuals
        cached = cache[:, 0] != 0
        out = torch.empty(x.shape[0], *kw["hidden_states"].shape[1:], dtype=self.dtype, device=x.device)
        out[cached] = self.run(_rows(kw, cached), cache[cached])
        plain = ~cached
        out[plain] = self.transformer(**_rows(kw, plain), **_rows(control, plain), return_dict=False)[0]
        return self.output(out.to(x.dtype), x)

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


def _rows(kw: dict[str, Any], index: Tensor) -> dict[str, Any]:
    """The transformer inputs of some rows: per-row tensors (and lists of them) indexed, the token
    ids (shared by all rows) and None kept."""
    memo: dict[int, Tensor] = {}

    def take(v: Tensor) -> Tensor:
        if id(v) not in memo:  # the ControlNet lists share tensors between blocks
            memo[id(v)] = v[index]
        return memo[id(v)]

    out: dict[str, Any] = {}
    for k, v in kw.items():
        if isinstance(v, list):
            out[k] = [take(e) for e in v]
        elif isinstance(v, Tensor) and k not in ("txt_ids", "img_ids"):
            out[k] = take(v)
        else:
            out[k] = v
    return out

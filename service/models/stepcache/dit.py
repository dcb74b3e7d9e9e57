"""First-Block-Cache for the SD3 and Flux transformers (diffusers' SD3Transformer2DModel and
FluxTransformer2DModel), per row.

The transformer's own embedding and output layers run as in its forward; between them the first
block always runs, its residual on the image tokens is the probe, and rows whose probe changed less
than their threshold since their last full evaluation add the cached residual of the other blocks
instead of running them. Rows that run them get exactly what the plain forward computes (the same
ops in the same order), which tests/models/test_stepcache_dit.py checks against diffusers' forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .state import run_cached


def _blocks(
    blocks: Sequence[Any], h: Tensor, enc: Tensor, temb: Tensor, **extra: Any
) -> tuple[Tensor, Tensor]:
    for block in blocks:
        enc, h = block(
            hidden_states=h, encoder_hidden_states=enc, temb=temb, joint_attention_kwargs=None, **extra
        )
    return enc, h


def _first_block_cached(
    rows: Tensor, blocks: Sequence[Any], h: Tensor, enc: Tensor, temb: Tensor, **extra: Any
) -> Tensor:
    """The image tokens after every block: the first on all rows, the rest on the rows that need them."""
    enc1, h1 = _blocks(blocks[:1], h, enc, temb, **extra)

    def rest(index: Tensor | None) -> Tensor:
        if index is None:
            return _blocks(blocks[1:], h1, enc1, temb, **extra)[1]
        return _blocks(blocks[1:], h1[index], enc1[index], temb[index], **extra)[1]

    return run_cached(rows, h1 - h, rest, base=h1)


def flux_forward(transformer: Any, rows: Tensor, **kw: Any) -> Tensor:
    """FluxTransformer2DModel's forward (the keyword arguments FluxVelocity passes) with the cache."""
    tr = transformer
    h = tr.x_embedder(kw["hidden_states"])
    timestep = kw["timestep"].to(h.dtype) * 1000
    guidance = kw.get("guidance")
    pooled = kw["pooled_projections"]
    if guidance is None:
        temb = tr.time_text_embed(timestep, pooled)
    else:
        temb = tr.time_text_embed(timestep, guidance.to(h.dtype) * 1000, pooled)
    enc = tr.context_embedder(kw["encoder_hidden_states"])
    rotary = tr.pos_embed(torch.cat((kw["txt_ids"], kw["img_ids"]), dim=0))
    blocks = [*tr.transformer_blocks, *tr.single_transformer_blocks]
    h = _first_block_cached(rows, blocks, h, enc, temb, image_rotary_emb=rotary)
    return tr.proj_out(tr.norm_out(h, temb))  # type: ignore[no-any-return]


def sd3_forward(transformer: Any, rows: Tensor, **kw: Any) -> Tensor:
    """SD3Transformer2DModel's forward (the keyword arguments SD3Velocity passes) with the cache."""
    tr = transformer
    x = kw["hidden_states"]
    height, width = x.shape[-2:]
    h = tr.pos_embed(x).contiguous()
    temb = tr.time_text_embed(kw["timestep"], kw["pooled_projections"])
    enc = tr.context_embedder(kw["encoder_hidden_states"])
    h = _first_block_cached(rows, list(tr.transformer_blocks), h, enc, temb)
    h = tr.proj_out(tr.norm_out(h, temb))
    p, c = tr.config.patch_size, tr.out_channels
    h = h.reshape(h.shape[0], height // p, width // p, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(h.shape[0], c, height, width)


def block_count(transformer: Any) -> int:
    return len(getattr(transformer, "transformer_blocks", ())) + len(
        getattr(transformer, "single_transformer_blocks", ())
    )

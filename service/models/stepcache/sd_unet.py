"""DeepCache for diffusers' UNet2DConditionModel (SD1 / SD2 / SDXL layouts), decided per row.

The split is DeepCache's default for Stable Diffusion (Ma et al. 2023, arXiv 2312.00858; the
authors' diffusers pipelines with ``cache_layer_id=0, cache_block_id=0``; the sd-webui extension's
``deepcache_cache_resnet_level`` 1 in LDM numbering): a cached evaluation runs ``conv_in``, the first
layer of the first down block (resnet, plus its transformer where the block has one), then the last
up block from its second layer on, and the output layers. Everything between - the rest of the first
level, every deeper level, the mid block, the deeper up blocks and the first layer of the last up
block - is "deep": its output (the features entering the last up block's second layer) comes from
the row's last full evaluation. The probe (threshold mode) is the first layer's output.

ControlNet: the ControlNets run on every evaluation (their residuals are computed before the split
for the call's rows); the two residuals that feed the shallow skip connections (``conv_in``'s and
the first layer's) are added on every evaluation, the ones that feed the deep part reach a cached
row only through its cached features (they were added at its last full evaluation).

Rows that run the deep part compute exactly what diffusers' forward computes (the same modules with
the same arguments in the same order), so a row with interval 1 or no cache is bit for bit the plain
UNet (tests/models/test_stepcache_sd.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .state import run_cached

Control = tuple[list[Tensor], Tensor]  # ControlNet (down residuals, mid residual), one per skip


def supports(unet: Any) -> bool:
    """Whether the split applies: the standard layout (every skip used once by the mirrored up block,
    the first level with a layer to skip after) and none of the forward's rarer options."""
    cfg = unet.config
    down, up = list(unet.down_blocks), list(unet.up_blocks)
    if len(down) < 2 or len(up) != len(down) or unet.mid_block is None:
        return False
    if cfg.get("center_input_sample") or cfg.get("class_embed_type") is not None:
        return False
    if cfg.get("addition_embed_type") not in (None, "text_time", "text"):
        return False
    first, last = down[0], up[-1]
    layers = len(first.resnets)
    return (
        layers >= 1
        and len(last.resnets) == layers + 1
        and getattr(last, "upsamplers", None) is None
        and not any(getattr(b, "s1", None) for b in up)  # FreeU changes the skips
    )


@dataclass
class Inputs:
    """One call's inputs to every part, each [rows, ...] (``select`` picks rows for the deep part)."""

    emb: Tensor
    enc: Tensor
    control: Control | None
    upsample: bool  # a size not divisible by the up factor: each up block is told its output size

    def select(self, index: Tensor | None) -> Inputs:
        if index is None:
            return self
        control = None
        if self.control is not None:
            down, mid = self.control
            control = ([r.index_select(0, index) for r in down], mid.index_select(0, index))
        return Inputs(
            self.emb.index_select(0, index), self.enc.index_select(0, index), control, self.upsample
        )


def _embed(
    unet: Any, sample: Tensor, t: Tensor, enc: Tensor, added: dict[str, Tensor] | None
) -> tuple[Tensor, Tensor]:
    """The time (+ SDXL's added) embedding and the text context, as diffusers' forward makes them."""
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=t), None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=enc, added_cond_kwargs=added)
    emb = emb + aug if aug is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    return emb, unet.process_encoder_hidden_states(encoder_hidden_states=enc, added_cond_kwargs=added)


def _layer(block: Any, i: int, h: Tensor, inp: Inputs, skip: Tensor | None = None) -> Tensor:
    """Layer ``i`` of a down block (``skip`` None) or an up block: its resnet, then its transformer."""
    if skip is not None:
        h = torch.cat([h, skip], dim=1)
    h = block.resnets[i](h, inp.emb)
    attentions = getattr(block, "attentions", None)
    if attentions is not None:
        h = attentions[i](
            h,
            encoder_hidden_states=inp.enc,
            cross_attention_kwargs=None,
            attention_mask=None,
            encoder_attention_mask=None,
            return_dict=False,
        )[0]
    return h


def _with_control(skips: list[Tensor], control: Control | None, start: int) -> list[Tensor]:
    """The skips ``start..`` plus their ControlNet residuals (diffusers adds them after the down path)."""
    if control is None:
        return skips
    return [s + r for s, r in zip(skips, control[0][start : start + len(skips)], strict=True)]


def deep(unet: Any, h: Tensor, inp: Inputs) -> Tensor:
    """Everything between the first down layer's output ``h`` and the last up block's last two layers
    (with L layers a level: the first level's layers 1..L-1 and its downsampler, the deeper levels,
    the mid block, the deeper up blocks, the last up block's layers 0..L-2)."""
    first, last = unet.down_blocks[0], unet.up_blocks[-1]
    level0 = h.shape[2:]
    skips = []
    for i in range(1, len(first.resnets)):
        h = _layer(first, i, h, inp)
        skips.append(h)
    if first.downsamplers is not None:
        for downsampler in first.downsamplers:
            h = downsampler(h)
        skips.append(h)
    for block in unet.down_blocks[1:]:
        if getattr(block, "has_cross_attention", False):
            h, res = block(hidden_states=h, temb=inp.emb, encoder_hidden_states=inp.enc)
        else:
            h, res = block(hidden_states=h, temb=inp.emb)
        skips.extend(res)
    skips = _with_control(skips, inp.control, 2)
    if getattr(unet.mid_block, "has_cross_attention", False):
        h = unet.mid_block(h, inp.emb, encoder_hidden_states=inp.enc)
    else:
        h = unet.mid_block(h, inp.emb)
    if inp.control is not None:
        h = h + inp.control[1]
    for block in unet.up_blocks[:-1]:
        n = len(block.resnets)
        res, skips = tuple(skips[-n:]), skips[:-n]
        size = (skips[-1].shape[2:] if skips else level0) if inp.upsample else None
        kw: dict[str, Any] = {"upsample_size": size}
        if getattr(block, "has_cross_attention", False):
            kw["encoder_hidden_states"] = inp.enc
        h = block(hidden_states=h, temb=inp.emb, res_hidden_states_tuple=res, **kw)
    for i in range(len(last.resnets) - 2):
        h = _layer(last, i, h, inp, skips.pop())
    return h


def forward(
    unet: Any,
    rows: Tensor,
    sample: Tensor,
    t: Tensor,
    enc: Tensor,
    added: dict[str, Tensor] | None,
    control: Control | None,
) -> Tensor:
    """``unet(sample, t, enc, added_cond_kwargs=added, <control residuals>)`` with the rows' cache."""
    emb, enc = _embed(unet, sample, t, enc, added)
    factor = 2**unet.num_upsamplers
    inp = Inputs(emb, enc, control, any(d % factor for d in sample.shape[-2:]))
    h0 = unet.conv_in(sample)
    h1 = _layer(unet.down_blocks[0], 0, h0, inp)
    skip0, skip1 = _with_control([h0, h1], control, 0)

    def part(index: Tensor | None) -> Tensor:
        return deep(unet, h1 if index is None else h1.index_select(0, index), inp.select(index))

    h = run_cached(rows, h1, part)
    last, skips = unet.up_blocks[-1], [skip0, skip1]
    for i in range(len(last.resnets) - 2, len(last.resnets)):
        h = _layer(last, i, h, inp, skips.pop())
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)  # type: ignore[no-any-return]

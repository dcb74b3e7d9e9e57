"""DeepCache for diffusers' UNet2DConditionModel (SD1 / SD2 / SDXL layouts), decided per row.

The split is DeepCache's default for Stable Diffusion (Ma et al. 2023, arXiv 2312.00858; the
authors' diffusers pipelines with ``cache_layer_id=0, cache_block_id=0``; the sd-webui extension's
``deepcache_cache_resnet_level`` 1 in LDM numbering): a cached evaluation runs ``conv_in``, the first
layer of the first down block (resnet, plus its transformer where the block has one), then the last
up block from its second layer on, and the output layers. Everything between - the rest of the first
level, every deeper level, the mid block, the deeper up blocks and the first layer of the last up
block - is "deep": its output (the features entering the last up block's second layer) comes from
the row's last full evaluation. The probe (threshold mode) is the first layer's output.

ControlNet: on every evaluation each ControlNet runs up to the residuals of the two shallow skip
connections (``conv_in``'s and the first down layer's: its conditioning embedding, ``conv_in`` and its
first down layer), which are added on every evaluation; its deeper layers (the residuals of the deep
skips and the mid block) run with the UNet's deep part, for the rows that run it
(controlnet/units.ControlSet.staged). A row whose cache holds gets those only through its cached
features (they were added at its last full evaluation), so it no longer pays for them.

Rows that run the deep part compute exactly what diffusers' forward computes (the same modules with
the same arguments in the same order), so a row with interval 1 or no cache is bit for bit the plain
UNet (tests/models/test_stepcache_sd.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from .state import run_cached

Control = tuple[list[Tensor], Tensor]  # ControlNet (down residuals, mid residual), one per skip


class StagedControl(Protocol):
    """A call's ControlNet residuals in two parts (controlnet/units.ControlSet.staged): the two
    shallow skips' residuals for every row, and the others computed for the rows that run the deep
    part only (the ControlNets' deeper layers run for those rows alone)."""

    shallow: list[Tensor]  # conv_in's and the first down layer's residuals, [rows, ...] each

    def deep(self, index: Tensor | None) -> Control | None:
        """The deeper skips' residuals (skip 2 on) and the mid block's for rows ``index`` (None:
        every row, in order); None when none of those rows has an active unit."""
        ...


@dataclass
class Full:
    """Residuals computed in full for every row, as a :class:`StagedControl`."""

    control: Control

    @property
    def shallow(self) -> list[Tensor]:
        return self.control[0][:2]

    def full(self) -> Control:
        return self.control

    def deep(self, index: Tensor | None) -> Control:
        down, mid = self.control[0][2:], self.control[1]
        if index is None:
            return down, mid
        return [r.index_select(0, index) for r in down], mid.index_select(0, index)


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
    control: StagedControl | None
    upsample: bool  # a size not divisible by the up factor: each up block is told its output size
    index: Tensor | None = None  # the call's rows these are (None: all, in order)

    def select(self, index: Tensor | None) -> Inputs:
        if index is None:
            return self
        emb, enc = self.emb.index_select(0, index), self.enc.index_select(0, index)
        return Inputs(emb, enc, self.control, self.upsample, index)

    def deep_control(self) -> Control | None:
        """The ControlNets' deep residuals for these rows (computed now: only rows that run the deep
        part pay for the ControlNets' deeper layers)."""
        return None if self.control is None else self.control.deep(self.index)


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


def layer(block: Any, i: int, h: Tensor, emb: Tensor, enc: Tensor, skip: Tensor | None = None) -> Tensor:
    """Layer ``i`` of a down block (``skip`` None) or an up block: its resnet, then its transformer,
    with the arguments the block's own forward passes (so a block run layer by layer is bit-equal)."""
    if skip is not None:
        h = torch.cat([h, skip], dim=1)
    h = block.resnets[i](h, emb)
    attentions = getattr(block, "attentions", None)
    if attentions is not None:
        h = attentions[i](
            h,
            encoder_hidden_states=enc,
            cross_attention_kwargs=None,
            attention_mask=None,
            encoder_attention_mask=None,
            return_dict=False,
        )[0]
    return h


def down_rest(blocks: Any, h: Tensor, emb: Tensor, enc: Tensor) -> tuple[Tensor, list[Tensor]]:
    """The down path after the first block's first layer (its output ``h``): that block's other
    layers and downsampler, then the deeper blocks; the output and the skips they make, in order.
    Shared by the UNet's deep part and the ControlNet's (controlnet/net.py), which copies its encoder."""
    first, skips = blocks[0], []
    for i in range(1, len(first.resnets)):
        h = layer(first, i, h, emb, enc)
        skips.append(h)
    if first.downsamplers is not None:
        for downsampler in first.downsamplers:
            h = downsampler(h)
        skips.append(h)
    for block in blocks[1:]:
        if getattr(block, "has_cross_attention", False):
            h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=enc)
        else:
            h, res = block(hidden_states=h, temb=emb)
        skips.extend(res)
    return h, skips


def _with_control(skips: list[Tensor], residuals: list[Tensor] | None) -> list[Tensor]:
    """The skips plus their ControlNet residuals (diffusers adds them after the down path)."""
    if residuals is None:
        return skips
    return [s + r for s, r in zip(skips, residuals, strict=True)]


def deep(unet: Any, h: Tensor, inp: Inputs) -> Tensor:
    """Everything between the first down layer's output ``h`` and the last up block's last two layers
    (with L layers a level: the first level's layers 1..L-1 and its downsampler, the deeper levels,
    the mid block, the deeper up blocks, the last up block's layers 0..L-2)."""
    last, level0 = unet.up_blocks[-1], h.shape[2:]
    h, skips = down_rest(unet.down_blocks, h, inp.emb, inp.enc)
    control = inp.deep_control()
    skips = _with_control(skips, None if control is None else control[0])
    if getattr(unet.mid_block, "has_cross_attention", False):
        h = unet.mid_block(h, inp.emb, encoder_hidden_states=inp.enc)
    else:
        h = unet.mid_block(h, inp.emb)
    if control is not None:
        h = h + control[1]
    for block in unet.up_blocks[:-1]:
        n = len(block.resnets)
        res, skips = tuple(skips[-n:]), skips[:-n]
        size = (skips[-1].shape[2:] if skips else level0) if inp.upsample else None
        kw: dict[str, Any] = {"upsample_size": size}
        if getattr(block, "has_cross_attention", False):
            kw["encoder_hidden_states"] = inp.enc
        h = block(hidden_states=h, temb=inp.emb, res_hidden_states_tuple=res, **kw)
    for i in range(len(last.resnets) - 2):
        h = layer(last, i, h, inp.emb, inp.enc, skips.pop())
    return h


def forward(
    unet: Any,
    rows: Tensor,
    sample: Tensor,
    t: Tensor,
    enc: Tensor,
    added: dict[str, Tensor] | None,
    control: StagedControl | None,
) -> Tensor:
    """``unet(sample, t, enc, added_cond_kwargs=added, <control residuals>)`` with the rows' cache."""
    emb, enc = _embed(unet, sample, t, enc, added)
    factor = 2**unet.num_upsamplers
    inp = Inputs(emb, enc, control, any(d % factor for d in sample.shape[-2:]))
    h0 = unet.conv_in(sample)
    h1 = layer(unet.down_blocks[0], 0, h0, emb, enc)
    skip0, skip1 = _with_control([h0, h1], None if control is None else control.shallow)

    def part(index: Tensor | None) -> Tensor:
        return deep(unet, h1 if index is None else h1.index_select(0, index), inp.select(index))

    h = run_cached(rows, h1, part)
    last, skips = unet.up_blocks[-1], [skip0, skip1]
    for i in range(len(last.resnets) - 2, len(last.resnets)):
        h = layer(last, i, h, emb, enc, skips.pop())
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)  # type: ignore[no-any-return]

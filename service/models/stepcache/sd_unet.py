"""DeepCache for diffusers' UNet2DConditionModel (SD1 / SD2 / SDXL layouts), decided per row.

The split point is a row's level, the sd-webui DeepCache extension's ``deepcache_cache_resnet_level``
(aria1th/sd-webui-deepcache-standalone, deepcache.py) in diffusers' terms. Number the UNet's skip
connections as the down path makes them - 0 is ``conv_in``'s output, then every layer (resnet, plus
its transformer where the block has one) and every downsampler of the down blocks in order (SD1.5:
0..11, SDXL: 0..8) - and the up layers by the skip each takes (the up path takes them in reverse).
A cached evaluation at level L runs the down path up to skip L and the up layers that take skips L
down to 0 (each with its block's upsampler where it ends a block), then the output layers;
everything between (the deeper down path, the mid block, the up layers that take the deeper skips)
is "deep", and its output - the features entering the up layer that takes skip L - comes from the
row's last full evaluation. Level 1 (the default: conv_in and the first down layer, the last up
block's last two layers) is the paper's split for SD (Ma et al. 2023, arXiv 2312.00858; the authors'
diffusers pipelines' ``cache_layer_id=0, cache_block_id=0``); level 0 runs conv_in and the last up
layer only (the extension's default); a level past the last skip is the last (the mid block alone is
deep), as the extension clamps it. The probe (threshold mode) is the output at skip L.

Rows of different levels share a call: the levels present are split points in order, each deciding
for its own rows only (the deep part of a shallower level holds the deeper split points).

ControlNet: on every evaluation each ControlNet runs up to the residuals of the skips up to the
call's shallowest level (its conditioning embedding, ``conv_in`` and its down path to there), which
are added on every evaluation; its deeper layers (the residuals of the deeper skips and the mid
block) run with the UNet's deep part, for the rows that run it (controlnet/units.ControlSet.staged).
A row whose cache holds gets those only through its cached features (they were added at its last
full evaluation), so it no longer pays for them.

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
    """A call's ControlNet residuals in two parts (controlnet/units.ControlSet.staged), split at the
    call's shallowest level: the residuals of the skips up to it for every row, and the others
    computed for the rows that run the deep part only (the ControlNets' deeper layers run for those
    rows alone)."""

    shallow: list[Tensor]  # the residuals of skips 0 .. the split, [rows, ...] each

    def deep(self, index: Tensor | None) -> Control | None:
        """The deeper skips' residuals (after the split) and the mid block's for rows ``index``
        (None: every row, in order); None when none of those rows has an active unit."""
        ...


def supports(unet: Any) -> bool:
    """Whether the split applies: the standard layout (the up path takes every skip once, the last
    up block has no upsampler) and none of the forward's rarer options."""
    cfg = unet.config
    down, up = list(unet.down_blocks), list(unet.up_blocks)
    if len(down) < 2 or len(up) != len(down) or unet.mid_block is None:
        return False
    if cfg.get("center_input_sample") or cfg.get("class_embed_type") is not None:
        return False
    if cfg.get("addition_embed_type") not in (None, "text_time", "text"):
        return False
    return (
        len(down[0].resnets) >= 1
        and sum(len(b.resnets) for b in up) == skips(unet)
        and getattr(up[-1], "upsamplers", None) is None
        and not any(getattr(b, "s1", None) for b in up)  # FreeU changes the skips
    )


def _down_items(blocks: Any) -> list[tuple[Any, int | None]]:
    """The down path after conv_in, one item per skip it makes: (block, layer) or (block, None) for
    the block's downsampler."""
    out: list[tuple[Any, int | None]] = []
    for block in blocks:
        out += [(block, i) for i in range(len(block.resnets))]
        if getattr(block, "downsamplers", None) is not None:
            out.append((block, None))
    return out


def skips(unet: Any) -> int:
    """How many skip connections the down path makes (SD1.5: 12, SDXL: 9)."""
    return 1 + len(_down_items(unet.down_blocks))


def down_path(
    blocks: Any, h: Tensor, emb: Tensor, enc: Tensor, lo: int, hi: int
) -> tuple[Tensor, list[Tensor]]:
    """From skip ``lo``'s features ``h`` (0: conv_in's output) through the down items that make skips
    ``lo + 1 .. hi``: the output and those skips, in order. Shared by the UNet's parts and the
    ControlNet's (controlnet/net.py), which copies its encoder."""
    made = []
    for block, i in _down_items(blocks)[lo:hi]:
        if i is None:
            for downsampler in block.downsamplers:
                h = downsampler(h)
        else:
            h = layer(block, i, h, emb, enc)
        made.append(h)
    return h, made


def mid(block: Any, h: Tensor, emb: Tensor, enc: Tensor) -> Tensor:
    if getattr(block, "has_cross_attention", False):
        return block(h, emb, encoder_hidden_states=enc)  # type: ignore[no-any-return]
    return block(h, emb)  # type: ignore[no-any-return]


@dataclass
class Inputs:
    """One call's inputs to every part, each [rows, ...] (``select`` picks rows for a deep part)."""

    emb: Tensor
    enc: Tensor
    control: StagedControl | None
    split: int  # the ControlNets ran up to this skip for every row (the call's shallowest level)
    upsample: bool  # a size not divisible by the up factor: each upsampler is told its output size
    deep_control: Control | None = None  # these rows' residuals of skips split+1.. and the mid block
    top: bool = True  # all the call's rows (a deep part's inputs: False)

    def select(self, index: Tensor | None) -> Inputs:
        """These inputs for rows ``index`` of these rows (None: all): a deep part's; the ControlNets'
        deeper layers run here, for those rows, when leaving the call's first split."""
        deep = self.deep_control
        if self.top:
            deep = None if self.control is None else self.control.deep(index)
        elif index is not None and deep is not None:
            deep = ([r.index_select(0, index) for r in deep[0]], deep[1].index_select(0, index))
        if index is None:
            return Inputs(self.emb, self.enc, self.control, self.split, self.upsample, deep, False)
        emb, enc = self.emb.index_select(0, index), self.enc.index_select(0, index)
        return Inputs(emb, enc, self.control, self.split, self.upsample, deep, False)

    def residual(self, s: int) -> Tensor | None:
        """The ControlNets' summed residual for skip ``s`` (None: none)."""
        if self.control is None:
            return None
        if s <= self.split:
            return self.control.shallow[s]
        return None if self.deep_control is None else self.deep_control[0][s - self.split - 1]


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


def _up(unet: Any, h: Tensor, made: dict[int, Tensor], inp: Inputs, hi: int, lo: int) -> Tensor:
    """The up layers that take skips ``hi`` down to ``lo + 1`` (``made``: those skips, and skip
    ``lo`` where ``lo >= 0``, whose size an upsampler before it is told), the ControlNets' residuals
    added to the skips as diffusers adds them."""
    items = [(b, j, j == len(b.resnets) - 1) for b in unet.up_blocks for j in range(len(b.resnets))]
    for s in range(hi, lo, -1):
        block, j, ends = items[len(items) - 1 - s]
        skip, res = made[s], inp.residual(s)
        h = layer(block, j, h, inp.emb, inp.enc, skip if res is None else skip + res)
        if ends and getattr(block, "upsamplers", None) is not None:
            size = made[s - 1].shape[2:] if inp.upsample else None
            for upsampler in block.upsamplers:
                h = upsampler(h, size)
    return h


def _segment(unet: Any, rows: Tensor, plan: list[int], lo: int, h: Tensor, inp: Inputs) -> Tensor:
    """From skip ``lo``'s features ``h`` (``lo`` -1: ``h`` is the input sample) to the features
    entering the up layer that takes skip ``lo`` (-1: the last up layer's output). ``plan``: the
    split points ahead (ascending, all > ``lo``); at the first, its rows decide (``run_cached``) and
    the rest is its deep part, another segment, run for the rows that need it."""
    start = max(lo, 0)
    if lo < 0:
        h = unet.conv_in(h)
    made = {start: h}
    hi = plan[0] if plan else skips(unet) - 1
    h, down = down_path(unet.down_blocks, h, inp.emb, inp.enc, start, hi)
    made.update(zip(range(start + 1, hi + 1), down, strict=True))
    if plan:
        here = rows.clone()
        here[_level(unet, rows) != hi, 0] = 0  # the rows of other levels run on here (they decide deeper)
        entry = h

        def part(index: Tensor | None) -> Tensor:
            sub = entry if index is None else entry.index_select(0, index)
            picked = rows if index is None else rows.index_select(0, index.to(rows.device))
            return _segment(unet, picked, plan[1:], hi, sub, inp.select(index))

        h = run_cached(here, entry, part)
    else:
        h = mid(unet.mid_block, h, inp.emb, inp.enc)
        if inp.deep_control is not None:
            h = h + inp.deep_control[1]
    return _up(unet, h, made, inp, hi, lo)


def _level(unet: Any, rows: Tensor) -> Tensor:
    """Each row's level; past the last skip it is the last, as the extension clamps it."""
    return rows[:, 5].clamp(max=skips(unet) - 1)


def levels(unet: Any, rows: Tensor) -> list[int]:
    """The split levels of a call's rows with a cache, ascending."""
    return sorted({int(v) for v in _level(unet, rows)[rows[:, 0] != 0].tolist()})


def forward(
    unet: Any,
    rows: Tensor,
    sample: Tensor,
    t: Tensor,
    enc: Tensor,
    added: dict[str, Tensor] | None,
    control: StagedControl | None,
    split: list[int] | None = None,
) -> Tensor:
    """``unet(sample, t, enc, added_cond_kwargs=added, <control residuals>)`` with the rows' cache;
    ``control``: the ControlNets staged at the call's first split (``split``: :func:`levels`)."""
    split = levels(unet, rows) if split is None else split
    emb, enc = _embed(unet, sample, t, enc, added)
    factor = 2**unet.num_upsamplers
    upsample = any(d % factor for d in sample.shape[-2:])
    inp = Inputs(emb, enc, control, split[0] if split else skips(unet) - 1, upsample)
    h = _segment(unet, rows, split, -1, sample, inp)
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)  # type: ignore[no-any-return]

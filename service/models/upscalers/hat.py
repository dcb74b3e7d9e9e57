"""HAT (Hybrid Attention Transformer, arXiv 2205.04437) in the published checkpoints' layout
(``HAT_SRx4_ImageNet-pretrain``, ``HAT-S_SRx4``, ``HAT-L_SRx4_ImageNet-pretrain``, ``Real_HAT_GAN_SRx4``
and community files from the same code), under ``params_ema`` / ``params``.

Read from the keys as spandrel reads them: embed dim, groups ``layers.{i}`` and their depths, heads
(the OCAB bias table's columns), window (the block bias table: (2ws-1)**2 rows), the overlapping
window (OCAB's table: (ws + ows - 1)**2 rows; ows = ws + int(ws * overlap_ratio)), the CAB's
compression and squeeze widths (its conv shapes), MLP width, qkv bias, ``conv_after_body`` (1conv) or
none (identity), ``upsample.{0,2,..}`` stages. HAT-S / HAT / HAT-L differ only in these numbers.

Each hybrid attention block (HAB): x + W-MSA(LN(x)) (odd blocks shifted, masked) + 0.01 * CAB(LN(x)),
then x + MLP(LN(x)); CAB = conv3x3 (C -> C/compress), GELU, conv3x3 back, channel attention
(global mean, 1x1 to C/squeeze, ReLU, 1x1 back, sigmoid, times the input). Each group ends with an
overlapping cross-attention block (OCAB): queries from ws x ws windows, keys and values from the
ows x ows window around each (zero padded at the image edge), its own bias table; then the group's
conv and the group's input. Tail: conv_before_upsample, pixel shuffles, conv_last.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .nets import ArchError, StateDict, take
from .ops import layer_norm, linear, window_merge, window_partition
from .swin import (
    WindowNet,
    attend,
    checked_scale,
    gather_bias,
    groups,
    keep,
    pixelshuffle_stages,
    rgb_embed,
    swin_bias,
    window_of,
)

G0 = "layers.0.residual_group"
KEYS = (
    "relative_position_index_SA",
    "conv_first.weight",
    f"{G0}.blocks.0.norm1.weight",
    f"{G0}.blocks.0.conv_block.cab.0.weight",
    f"{G0}.blocks.0.conv_block.cab.3.attention.1.weight",
    f"{G0}.blocks.0.mlp.fc1.bias",
    f"{G0}.overlap_attn.relative_position_bias_table",
    f"{G0}.overlap_attn.qkv.weight",
    "conv_last.weight",
)
CONV_SCALE = 0.01  # the CAB branch's weight (a constructor argument, not stored; every HAT file uses it)


def detect(state: StateDict) -> bool:
    return all(k in state for k in KEYS)


def overlap_index(ws: int, ows: int) -> Tensor:
    """[ws*ws, ows*ows]: for a query at (y, x) of a ws window and a key at (y', x') of the ows window
    around it (starting (ows - ws) / 2 earlier), the row of the (ws + ows - 1)**2 bias table holding
    offset (y' - y, x' - x), shifted to start at 0."""
    qy, qx = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
    ky, kx = torch.meshgrid(torch.arange(ows), torch.arange(ows), indexing="ij")
    dy = ky.flatten()[None, :] - qy.flatten()[:, None] + ws - ows + 1
    dx = kx.flatten()[None, :] - qx.flatten()[:, None] + ws - ows + 1
    return dy * (ws + ows - 1) + dx


class HAT(WindowNet):
    arch = "HAT"
    family = "HAT"
    overlap = 12  # the overlapping window's side (ows)
    stages: tuple[int, ...] = ()

    def group(self, t: Tensor, i: int, h: int, w: int) -> Tensor:
        b, _, c = t.shape
        start = t
        g = f"layers.{i}.residual_group"
        for j in range(self.depths[i]):
            p = f"{g}.blocks.{j}"
            y = layer_norm(t, self.w, f"{p}.norm1").view(b, h, w, c)
            cab = self.cab(y.permute(0, 3, 1, 2), f"{p}.conv_block.cab")
            attn = self.window_attn(y, f"{p}.attn", self.heads[i], shifted=j % 2 == 1)
            t = t + attn.reshape(b, h * w, c) + cab.permute(0, 2, 3, 1).reshape(b, h * w, c) * CONV_SCALE
            t = t + self.mlp(layer_norm(t, self.w, f"{p}.norm2"), f"{p}.mlp")
        t = self.ocab(t, f"{g}.overlap_attn", self.heads[i], h, w)
        image = t.transpose(1, 2).reshape(b, c, h, w)
        return self.after_body(image, f"layers.{i}.conv").flatten(2).transpose(1, 2) + start

    def cab(self, x: Tensor, prefix: str) -> Tensor:
        y = self.conv(F.gelu(self.conv(x, f"{prefix}.0")), f"{prefix}.2")
        a = F.relu(self.conv(y.mean((2, 3), keepdim=True), f"{prefix}.3.attention.1"))
        return y * torch.sigmoid(self.conv(a, f"{prefix}.3.attention.3"))

    def ocab(self, t: Tensor, prefix: str, heads: int, h: int, w: int) -> Tensor:
        b, _, c = t.shape
        ws, ows, d = self.window, self.overlap, c // heads
        y = layer_norm(t, self.w, f"{prefix}.norm1")
        qkv = linear(y, self.w, f"{prefix}.qkv").view(b, h, w, 3, c)
        q = window_partition(qkv[..., 0, :].contiguous(), ws, ws)  # [b*nW, ws*ws, c]
        kv = qkv[..., 1:, :].permute(0, 3, 4, 1, 2).reshape(b, 2 * c, h, w)
        # every ows x ows neighbourhood (stride ws, zero padded): [b, 2c * ows*ows, nW]
        cols = F.unfold(kv, (ows, ows), stride=ws, padding=(ows - ws) // 2)
        nw = cols.shape[-1]
        cols = cols.view(b, 2, c, ows * ows, nw).permute(1, 0, 4, 3, 2).reshape(2, b * nw, ows * ows, c)
        qh = q.reshape(b * nw, ws * ws, heads, d).transpose(1, 2) * d**-0.5
        kh, vh = (m.reshape(b * nw, ows * ows, heads, d).transpose(1, 2) for m in cols)
        out = attend(qh, kh, vh, self.w[f"{prefix}.bias"]).transpose(1, 2).reshape(b * nw, ws * ws, c)
        t = linear(window_merge(out, ws, ws, h, w).reshape(b, h * w, c), self.w, f"{prefix}.proj") + t
        return t + self.mlp(layer_norm(t, self.w, f"{prefix}.norm2"), f"{prefix}.mlp")

    def tail(self, body: Tensor, x: Tensor) -> Tensor:
        return self.shuffle_up(body, self.stages)


def load(state: StateDict) -> HAT:
    if "absolute_pos_embed" in state:
        raise ArchError("HAT with an absolute position embedding (ape) is not supported")
    embed = rgb_embed(state)
    ws = window_of(state, f"{G0}.blocks.0.attn.relative_position_bias_table")
    side = math.isqrt(take(state, f"{G0}.overlap_attn.relative_position_bias_table", 2).shape[0])
    ows = side - ws + 1
    if (
        side * side != state[f"{G0}.overlap_attn.relative_position_bias_table"].shape[0]
        or not ws <= ows <= 2 * ws
        or (ows - ws) % 2
    ):
        raise ArchError(f"an overlapping-attention table of {side}**2 rows does not fit window {ws}")
    depths, heads = groups(state, "residual_group.overlap_attn.relative_position_bias_table", embed)
    weights: dict[str, Tensor] = {}
    keep(state, weights, "conv_first", "norm", "conv_before_upsample.0", "upsample", "conv_last")
    keep(state, weights, "patch_embed.norm", "conv_after_body", optional=True)
    oca = overlap_index(ws, ows)
    for i, depth in enumerate(depths):
        g = f"layers.{i}.residual_group"
        for j in range(depth):
            p = f"{g}.blocks.{j}"
            keep(state, weights, f"{p}.norm1", f"{p}.norm2", f"{p}.mlp", f"{p}.attn.qkv", f"{p}.attn.proj")
            keep(state, weights, f"{p}.conv_block.cab")
            swin_bias(state, weights, f"{p}.attn", ws)
        o = f"{g}.overlap_attn"
        keep(state, weights, f"{o}.norm1", f"{o}.norm2", f"{o}.mlp", f"{o}.qkv", f"{o}.proj")
        table = take(state, f"{o}.relative_position_bias_table", 2)
        if table.shape[0] != side * side:
            raise ArchError(
                f"{o}.relative_position_bias_table has {table.shape[0]} rows; expected {side * side}"
            )
        weights[f"{o}.bias"] = gather_bias(table, oca)
        keep(state, weights, f"layers.{i}.conv", optional=True)
    stages = tuple(pixelshuffle_stages(state))
    return HAT(
        weights,
        scale=checked_scale(math.prod(stages)),
        window=ws,
        overlap=ows,
        depths=depths,
        heads=heads,
        stages=stages,
    )

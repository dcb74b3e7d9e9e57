"""OmniSR (Omni Self-Attention, arXiv 2304.08896; the published OmniSR_X{2,3,4}_{DIV2K,DF2K} files and
community "*OmniSR*" models), in the published code's key layout:

``input`` (3x3), residual groups ``residual_layer.{g}`` (OSAG: OSA blocks ``residual_layer.{g}.
residual_layer.{b}.layer.{0..12}``, a 1x1 conv after them, the skip, then the ESA gate ``esa.*``),
``output`` (3x3) plus the first features, ``up.0`` (conv + pixel shuffle).

An OSA block, by its ``layer`` indices: 0 MBConv (1x1, depthwise 3x3, squeeze-excitation ``fn.4.gate``,
1x1; residual); 2 attention inside ``window`` x ``window`` blocks and 8 the same over a grid (pixels
``H / window`` apart), both with a learned relative position bias (``rel_pos_bias``) and a LayerNorm
first; 5 channel attention inside each block and 11 across the blocks (the pixels at one offset of
every block), L2-normalised with a per-head ``temperature``; 4, 6, 10, 12 gated depthwise-conv
feed-forwards. Each of 4-6 and 10-12 has a channel LayerNorm (eps 1e-6) first and a residual.

The image is zero-padded to a multiple of the window (and to at least 16 px, which the ESA's strided
conv and 7 px max-pool need; the published code refuses smaller inputs) and the output cropped back.
The files' thop counters (``total_ops``, ``total_params``) are ignored.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .nets import ArchError, Net, StateDict, seq_len, take
from .swin import attend, gather_bias

KEYS = ("residual_layer.0.residual_layer.0.layer.0.fn.0.weight", "input.weight", "up.0.weight")
HEADS = 4  # the published blocks: attention heads of width C / 4, channel attention over 4 heads
MIN_SIZE = 16
LN2D_EPS = 1e-6


def detect(state: StateDict) -> bool:
    return all(k in state for k in KEYS)


def _windows(x: Tensor, ws: int, grid: bool) -> Tensor:
    """[B, H, W, C] -> [B * nW, ws * ws, C]: ``ws`` x ``ws`` blocks, or (``grid``) the ws x ws pixels
    H / ws apart that share one offset inside the blocks."""
    if not grid:
        return ops.window_partition(x, ws, ws)
    b, h, w, c = x.shape
    x = x.view(b, ws, h // ws, ws, w // ws, c).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(-1, ws * ws, c)


def _unwindows(x: Tensor, ws: int, grid: bool, h: int, w: int) -> Tensor:
    if not grid:
        return ops.window_merge(x, ws, ws, h, w)
    b = x.shape[0] // ((h // ws) * (w // ws))
    x = x.view(b, h // ws, w // ws, ws, ws, -1).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, h, w, -1)


class OmniSR(Net):
    arch = "OmniSR"
    family = "OmniSR"
    groups = 5
    blocks = 1
    window = 8

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        ws = self.window
        ph, pw = (max(-(-n // ws) * ws, -(-MIN_SIZE // ws) * ws) - n for n in (h, w))
        x = F.pad(x, (0, pw, 0, ph))
        first = ops.conv(x, self.w, "input")
        out = first
        for g in range(self.groups):
            out = self._group(out, f"residual_layer.{g}")
        out = ops.conv(out, self.w, "output") + first
        out = F.pixel_shuffle(ops.conv(out, self.w, "up.0"), self.scale)
        return out[..., : h * self.scale, : w * self.scale]

    def _group(self, x: Tensor, name: str) -> Tensor:
        y = x
        for b in range(self.blocks):
            y = self._block(y, f"{name}.residual_layer.{b}.layer")
        y = ops.conv(y, self.w, f"{name}.residual_layer.{self.blocks}") + x
        return self._esa(y, f"{name}.esa")

    def _esa(self, x: Tensor, name: str) -> Tensor:
        """Enhanced spatial attention: a gate from a strided, max-pooled, upsampled view of the image."""
        c1_ = ops.conv(x, self.w, f"{name}.conv1")
        c1 = ops.conv(c1_, self.w, f"{name}.conv2", stride=2, pad=0)
        c3 = ops.conv(F.max_pool2d(c1, kernel_size=7, stride=3), self.w, f"{name}.conv3")
        c3 = F.interpolate(c3, x.shape[-2:], mode="bilinear", align_corners=False)
        return x * torch.sigmoid(
            ops.conv(c3 + ops.conv(c1_, self.w, f"{name}.conv_f"), self.w, f"{name}.conv4")
        )

    def _block(self, x: Tensor, name: str) -> Tensor:
        x = x + self._mbconv(x, f"{name}.0.fn")
        x = self._attention(x, f"{name}.2", grid=False)
        x = x + self._gated_ff(ops.layer_norm2d(x, self.w, f"{name}.4.norm", LN2D_EPS), f"{name}.4.fn")
        x = x + self._channel(ops.layer_norm2d(x, self.w, f"{name}.5.norm", LN2D_EPS), f"{name}.5.fn", False)
        x = x + self._gated_ff(ops.layer_norm2d(x, self.w, f"{name}.6.norm", LN2D_EPS), f"{name}.6.fn")
        x = self._attention(x, f"{name}.8", grid=True)
        x = x + self._gated_ff(ops.layer_norm2d(x, self.w, f"{name}.10.norm", LN2D_EPS), f"{name}.10.fn")
        x = x + self._channel(ops.layer_norm2d(x, self.w, f"{name}.11.norm", LN2D_EPS), f"{name}.11.fn", True)
        return x + self._gated_ff(ops.layer_norm2d(x, self.w, f"{name}.12.norm", LN2D_EPS), f"{name}.12.fn")

    def _mbconv(self, x: Tensor, name: str) -> Tensor:
        y = F.gelu(ops.conv(x, self.w, f"{name}.0"))
        y = F.gelu(ops.dwconv(y, self.w, f"{name}.2"))
        gate = F.silu(ops.linear(y.mean((2, 3)), self.w, f"{name}.4.gate.1"))
        gate = torch.sigmoid(ops.linear(gate, self.w, f"{name}.4.gate.3"))
        return ops.conv(y * gate[:, :, None, None], self.w, f"{name}.5")

    def _gated_ff(self, x: Tensor, name: str) -> Tensor:
        x1, x2 = ops.dwconv(ops.conv(x, self.w, f"{name}.project_in"), self.w, f"{name}.dwconv").chunk(2, 1)
        return ops.conv(F.gelu(x1) * x2, self.w, f"{name}.project_out")

    def _attention(self, x: Tensor, name: str, grid: bool) -> Tensor:
        """x + window attention (inside blocks, or over the grid) of the LayerNormed pixels."""
        b, c, h, w = x.shape
        ws, d = self.window, c // HEADS
        t = _windows(ops.layer_norm(x.permute(0, 2, 3, 1), self.w, f"{name}.norm"), ws, grid)
        q, k, v = (
            part.reshape(part.shape[0], ws * ws, HEADS, d).transpose(1, 2)
            for part in ops.linear(t, self.w, f"{name}.fn.to_qkv").chunk(3, dim=-1)
        )
        bias = self.w.get(f"{name}.fn.bias")  # no position bias in the file: none added
        out = attend(
            q * d**-0.5, k, v, bias if bias is not None else torch.zeros((), dtype=q.dtype, device=q.device)
        )
        out = out.transpose(1, 2).reshape(-1, ws * ws, c)
        out = ops.linear(out, self.w, f"{name}.fn.to_out.0")
        return x + _unwindows(out, ws, grid, h, w).permute(0, 3, 1, 2)

    def _channel(self, x: Tensor, name: str, grid: bool) -> Tensor:
        """Channel attention (d x d per head) over the pixels of each block, or (``grid``) over the
        pixels at one offset of every block."""
        b, c, h, w = x.shape
        ws, d = self.window, c // HEADS
        qkv = ops.dwconv(ops.conv(x, self.w, f"{name}.qkv"), self.w, f"{name}.qkv_dwconv")
        # [B, heads, d, H/ws, ws, W/ws, ws] -> [B, groups, heads, d, members]
        order = (0, 4, 6, 1, 2, 3, 5) if grid else (0, 3, 5, 1, 2, 4, 6)
        members = (h // ws) * (w // ws) if grid else ws * ws
        q, k, v = (
            t.reshape(b, HEADS, d, h // ws, ws, w // ws, ws).permute(*order).reshape(b, -1, HEADS, d, members)
            for t in qkv.chunk(3, dim=1)
        )
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.w[f"{name}.temperature"], dim=-1)
        out = attn @ v
        return ops.conv(self._ungroup(out, b, c, h, w, grid), self.w, f"{name}.project_out")

    def _ungroup(self, out: Tensor, b: int, c: int, h: int, w: int, grid: bool) -> Tensor:
        ws, d = self.window, c // HEADS
        if grid:  # [B, (ph pw), heads, d, (y x)]
            out = out.reshape(b, ws, ws, HEADS, d, h // ws, w // ws).permute(0, 3, 4, 5, 1, 6, 2)
        else:  # [B, (y x), heads, d, (ph pw)]
            out = out.reshape(b, h // ws, w // ws, HEADS, d, ws, ws).permute(0, 3, 4, 1, 5, 2, 6)
        return out.reshape(b, c, h, w)


def load(state: StateDict) -> OmniSR:
    weights = {k: v.float() for k, v in state.items() if not k.endswith(("total_ops", "total_params"))}
    first = take(state, "input.weight", 4)
    nf = first.shape[0]
    if first.shape[1] != 3 or nf % HEADS:
        raise ArchError(f"input conv {tuple(first.shape)}; expected RGB in and a multiple of {HEADS} out")
    out = take(state, "up.0.weight", 4).shape[0]
    scale = math.isqrt(out // 3)
    if scale * scale * 3 != out:
        raise ArchError(f"up.0 has {out} output channels; expected 3 * scale**2")
    groups = seq_len(state, "residual_layer")
    blocks = seq_len(state, "residual_layer.0.residual_layer") - 1
    if groups < 1 or blocks < 1:
        raise ArchError(f"{groups} residual groups of {blocks} blocks")
    table = state.get("residual_layer.0.residual_layer.0.layer.2.fn.rel_pos_bias.weight")
    window = 8  # the published default when the file has no position bias to read it from
    if table is not None:
        window = (math.isqrt(table.shape[0]) + 1) // 2
        if (2 * window - 1) ** 2 != table.shape[0]:
            raise ArchError(f"rel_pos_bias has {table.shape[0]} rows; expected (2 * window - 1)**2")
    index = ops.relative_index(window, window)
    for g in range(groups):
        for b in range(blocks):
            for a in (2, 8):
                name = f"residual_layer.{g}.residual_layer.{b}.layer.{a}.fn"
                rows = weights.get(f"{name}.rel_pos_bias.weight")
                if rows is not None:  # [heads, N, N]: the table looked up for each token pair, once
                    weights[f"{name}.bias"] = gather_bias(rows, index)
    return OmniSR(weights, scale=scale, groups=groups, blocks=blocks, window=window)

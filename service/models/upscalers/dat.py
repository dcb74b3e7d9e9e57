"""DAT (Dual Aggregation Transformer, arXiv 2308.03340; the published DAT / DAT-S / DAT-2 / DAT-light
checkpoints and the community "4x*DAT*" models), in the published code's key layout:

``conv_first``; ``before_RG.1`` (LayerNorm of the tokens); residual groups ``layers.{i}`` of blocks
``layers.{i}.blocks.{j}`` (``norm1``, ``attn``, ``norm2``, ``ffn``) and a residual conv ``layers.{i}.conv``
(one 3x3, or "3conv": ``conv.0/2/4``); ``norm``; ``conv_after_body`` (same two forms); then either
``conv_before_upsample.0`` + ``upsample.{0,2,..}`` (conv + pixel shuffle) + ``conv_last``, or the light
models' one-step ``upsample.0``.

Blocks alternate: even j is spatial window attention, the channels split in two halves attending in
``split`` (h x w) windows and in the transposed (w x h) windows, with a dynamic position bias (an MLP
over the window's relative offsets, ``attns.{0,1}.pos``) and, in some blocks, windows shifted by half
(with the usual mask between regions that the shift brings together); odd j is channel attention
(L2-normalised q, k over the tokens, a per-head ``temperature``). Both mix their result with a
depthwise-conv branch of v (``dwconv``) through ``channel_interaction`` / ``spatial_interaction`` gates.
The feed-forward (``ffn``) gates half of its hidden channels with a depthwise conv of the other half.

Hyper-parameters come from the keys: width (``conv_first``), groups and blocks per group (key
indices), heads (``temperature`` or the position MLP's output), window (``rpe_biases``' last row + 1,
what the published code stores), FFN expansion (``ffn.fc1``), residual conv form, upsampler and scale.
Buffers the file also stores (position tables, masks for the 64 px training size) are recomputed for
the image at hand. Sizes that are not a multiple of the window are zero-padded inside each attention,
as the published code does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .nets import ArchError, Net, StateDict, seq_len, take
from .swin import attend, gather_bias

KEYS = (
    "conv_first.weight",
    "before_RG.1.weight",
    "layers.0.blocks.0.norm1.weight",
    "layers.0.blocks.0.ffn.fc1.weight",
    "layers.0.blocks.0.ffn.sg.norm.weight",
    "layers.0.blocks.0.ffn.sg.conv.weight",
    "layers.0.blocks.0.attn.qkv.weight",
    "layers.0.blocks.0.attn.dwconv.1.running_mean",
    "layers.0.blocks.0.attn.channel_interaction.1.weight",
    "layers.0.blocks.0.attn.spatial_interaction.0.weight",
    "layers.0.blocks.0.attn.attns.0.rpe_biases",
    "layers.0.blocks.0.attn.attns.0.pos.pos_proj.weight",
    "norm.weight",
)
RGB_MEAN = (0.4488, 0.4371, 0.4040)
MASKED = -100.0  # the published code's mask value between regions a shifted window brings together
_BUFFERS = ("rpe_biases", "relative_position_index", "attn_mask_0", "attn_mask_1", "num_batches_tracked")


def detect(state: StateDict) -> bool:
    return (
        all(k in state for k in KEYS)
        and ("conv_after_body.weight" in state or "conv_after_body.4.weight" in state)
        and ("conv_last.weight" in state or "upsample.0.weight" in state)
    )


def shifted(group: int, block: int) -> bool:
    """Which spatial blocks shift their windows (the published schedule: groups alternate phase)."""
    if group % 2 == 0:
        return block > 0 and (block - 2) % 4 == 0
    return block % 4 == 0


def shift_mask(h: int, w: int, wh: int, ww: int, sh: int, sw: int) -> Tensor:
    """[nW, N, N]: 0 between tokens of a shifted window that come from one region of the unshifted
    image, MASKED between tokens the cyclic shift brought together from different regions."""
    label = torch.zeros(h, w)
    n = 0
    for ys in (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)):
        for xs in (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)):
            label[ys, xs] = n
            n += 1
    win = ops.window_partition(label.view(1, h, w, 1), wh, ww).squeeze(-1)  # [nW, N]
    diff = win[:, None, :] - win[:, :, None]
    return torch.where(diff != 0, MASKED, 0.0)


def _tokens(x: Tensor) -> Tensor:
    return x.flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, H*W, C]


def _image(t: Tensor, h: int, w: int) -> Tensor:
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)


class DAT(Net):
    arch = "DAT"
    family = "DAT"
    supports_half = False  # spandrel marks DAT float16-unsafe (bfloat16 is fine): float32 instead
    depth: tuple[int, ...] = ()
    heads: tuple[int, ...] = ()
    split = (8, 32)
    direct = False  # the light models' one-step upsampler
    three_conv = False

    def forward(self, x: Tensor) -> Tensor:
        mean = torch.tensor(RGB_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = ops.conv(x - mean, self.w, "conv_first")
        x = self._resi(self._features(x), "conv_after_body") + x
        if self.direct:
            x = F.pixel_shuffle(ops.conv(x, self.w, "upsample.0"), self.scale)
        else:
            x = F.leaky_relu(ops.conv(x, self.w, "conv_before_upsample.0"), 0.01)
            i = 0
            while f"upsample.{i}.weight" in self.w:
                weight = self.w[f"upsample.{i}.weight"]
                x = F.pixel_shuffle(ops.conv(x, self.w, f"upsample.{i}"), _factor(weight))
                i += 2
            x = ops.conv(x, self.w, "conv_last")
        return x + mean

    def _resi(self, x: Tensor, name: str) -> Tensor:
        """The residual conv: one 3x3, or 3x3 -> 1x1 -> 3x3 at a quarter width (LeakyReLU 0.2)."""
        if not self.three_conv:
            return ops.conv(x, self.w, name)
        x = F.leaky_relu(ops.conv(x, self.w, f"{name}.0"), 0.2)
        x = F.leaky_relu(ops.conv(x, self.w, f"{name}.2"), 0.2)
        return ops.conv(x, self.w, f"{name}.4")

    def _features(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        t = ops.layer_norm(_tokens(x), self.w, "before_RG.1")
        for i, depth in enumerate(self.depth):
            res = t
            for j in range(depth):
                name = f"layers.{i}.blocks.{j}"
                u = ops.layer_norm(t, self.w, f"{name}.norm1")
                if j % 2 == 0:
                    t = t + self._spatial(u, h, w, f"{name}.attn", self.heads[i], shifted(i, j))
                else:
                    t = t + self._channel(u, h, w, f"{name}.attn", self.heads[i])
                t = t + self._ffn(ops.layer_norm(t, self.w, f"{name}.norm2"), h, w, f"{name}.ffn")
            t = res + _tokens(self._resi(_image(t, h, w), f"layers.{i}.conv"))
        return _image(ops.layer_norm(t, self.w, "norm"), h, w)

    def _ffn(self, t: Tensor, h: int, w: int, name: str) -> Tensor:
        t = F.gelu(ops.linear(t, self.w, f"{name}.fc1"))
        t1, t2 = t.chunk(2, dim=-1)
        t2 = ops.layer_norm(t2, self.w, f"{name}.sg.norm")
        t2 = _tokens(ops.dwconv(_image(t2, h, w), self.w, f"{name}.sg.conv"))
        return ops.linear(t1 * t2, self.w, f"{name}.fc2")

    def _gates(self, conv_in: Tensor, name: str) -> Tensor:
        """The depthwise-conv branch of v (conv, BatchNorm, GELU)."""
        return F.gelu(
            ops.batch_norm(ops.dwconv(conv_in, self.w, f"{name}.dwconv.0"), self.w, f"{name}.dwconv.1")
        )

    def _channel_map(self, x: Tensor, name: str) -> Tensor:
        """[B, C, 1, 1] before the sigmoid: pooled, squeezed to C/8, BatchNorm, GELU, back to C."""
        y = ops.conv(x.mean((2, 3), keepdim=True), self.w, f"{name}.channel_interaction.1")
        y = F.gelu(ops.batch_norm(y, self.w, f"{name}.channel_interaction.2"))
        return ops.conv(y, self.w, f"{name}.channel_interaction.4")

    def _spatial_map(self, x: Tensor, name: str) -> Tensor:
        """[B, 1, H, W] before the sigmoid: 1x1 to C/16, BatchNorm, GELU, 1x1 to one channel."""
        y = ops.conv(x, self.w, f"{name}.spatial_interaction.0")
        y = F.gelu(ops.batch_norm(y, self.w, f"{name}.spatial_interaction.1"))
        return ops.conv(y, self.w, f"{name}.spatial_interaction.3")

    def _spatial(self, t: Tensor, h: int, w: int, name: str, heads: int, shift: bool) -> Tensor:
        b, n, c = t.shape
        qkv = ops.linear(t, self.w, f"{name}.qkv").reshape(b, n, 3, c).permute(2, 0, 1, 3)  # [3, B, L, C]
        v = _image(qkv[2], h, w)
        m = max(self.split)
        ph, pw = -h % m, -w % m
        grid = F.pad(qkv.reshape(3 * b, h, w, c), (0, 0, 0, pw, 0, ph)).view(3, b, h + ph, w + pw, c)
        a, bw = self.split
        halves = []
        for k, (wh, ww) in enumerate(((a, bw), (bw, a))):
            part = grid[..., k * c // 2 : (k + 1) * c // 2]
            bias = self.w[f"{name}.attns.{k}.bias"]
            if shift:
                sh, sw = wh // 2, ww // 2
                mask = shift_mask(h + ph, w + pw, wh, ww, sh, sw).to(part)
                part = torch.roll(part, (-sh, -sw), (2, 3))
                out = torch.roll(_window_attention(part, wh, ww, heads // 2, bias, mask), (sh, sw), (1, 2))
            else:
                out = _window_attention(part, wh, ww, heads // 2, bias, None)
            halves.append(out[:, :h, :w, :].reshape(b, n, c // 2))
        att = torch.cat(halves, 2)
        conv_x = self._gates(v, name)
        # both gates read the branches as they are before either is gated
        channel, spatial = self._channel_map(conv_x, name), self._spatial_map(_image(att, h, w), name)
        att = att * torch.sigmoid(channel).view(b, 1, c)
        conv_x = torch.sigmoid(spatial) * conv_x
        return ops.linear(att + _tokens(conv_x), self.w, f"{name}.proj")

    def _channel(self, t: Tensor, h: int, w: int, name: str, heads: int) -> Tensor:
        b, n, c = t.shape
        qkv = ops.linear(t, self.w, f"{name}.qkv").reshape(b, n, 3, heads, c // heads)
        q, k, v = qkv.permute(2, 0, 3, 4, 1)  # each [B, heads, d, N]
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        temperature = self.w[f"{name}.temperature"]
        attn = torch.softmax((q @ k.transpose(-2, -1)) * temperature, dim=-1)
        att = (attn @ v).permute(0, 3, 1, 2).reshape(b, n, c)
        conv_x = self._gates(v.reshape(b, c, h, w), name)
        # the other way round from the spatial blocks: the channel gate from the attention branch
        channel, spatial = self._channel_map(_image(att, h, w), name), self._spatial_map(conv_x, name)
        att = att * torch.sigmoid(spatial).flatten(2).transpose(1, 2)
        conv_x = conv_x * torch.sigmoid(channel)
        return ops.linear(att + _tokens(conv_x), self.w, f"{name}.proj")


def _window_attention(qkv: Tensor, wh: int, ww: int, heads: int, bias: Tensor, mask: Tensor | None) -> Tensor:
    """[3, B, H, W, C] (H, W multiples of the window) -> [B, H, W, C]: attention inside each
    wh x ww window, plus the position bias [heads, N, N] and the shift mask [nW, N, N]."""
    _, b, h, w, c = qkv.shape
    n, d = wh * ww, c // heads

    def split(x: Tensor) -> Tensor:
        return ops.window_partition(x, wh, ww).reshape(-1, n, heads, d).transpose(1, 2)

    # in chunks of windows (swin.attend): a 288 px tile's scores at once would take gigabytes
    out = attend(split(qkv[0]) * d**-0.5, split(qkv[1]), split(qkv[2]), bias, mask)
    return ops.window_merge(out.transpose(1, 2).reshape(-1, n, c), wh, ww, h, w)


def _factor(weight: Tensor) -> int:
    """A pixel-shuffle conv's factor: its output channels are its input channels times factor**2."""
    return math.isqrt(weight.shape[0] // weight.shape[1])


def _position_bias(w: dict[str, Tensor], name: str, wh: int, ww: int) -> Tensor:
    """[heads, N, N]: the dynamic position bias (an MLP over every relative offset of a wh x ww window)
    looked up for each token pair. It depends on the weights only, so it is computed once, here."""
    x = ops.linear(ops.offsets(wh, ww), w, f"{name}.pos_proj")
    for k in (1, 2, 3):
        x = ops.linear(F.relu(ops.layer_norm(x, w, f"{name}.pos{k}.0")), w, f"{name}.pos{k}.2")
    return gather_bias(x, ops.relative_index(wh, ww))


def load(state: StateDict) -> DAT:
    weights = {k: v.float() for k, v in state.items() if k.rsplit(".", 1)[-1] not in _BUFFERS}
    first = take(state, "conv_first.weight", 4)
    in_nc, dim = first.shape[1], first.shape[0]
    if in_nc != 3:
        raise ArchError(f"{in_nc} input channels; expected RGB")
    depth = tuple(seq_len(state, f"layers.{i}.blocks") for i in range(seq_len(state, "layers")))
    if not depth or min(depth) == 0:
        raise ArchError(f"residual groups with blocks {list(depth)}")
    heads = tuple(
        take(state, f"layers.{i}.blocks.1.attn.temperature").shape[0]
        if d >= 2
        else 2 * take(state, f"layers.{i}.blocks.0.attn.attns.0.pos.pos3.2.weight").shape[0]
        for i, d in enumerate(depth)
    )
    rpe = take(state, "layers.0.blocks.0.attn.attns.0.rpe_biases", 2)
    split = (int(rpe[-1, 0].item()) + 1, int(rpe[-1, 1].item()) + 1)
    # spatial blocks split the width in halves over heads // 2 heads each; channel blocks over heads
    if min(split) < 1 or any(h < 2 or dim % h or (dim // 2) % (h // 2) for h in heads):
        raise ArchError(f"window {split} and heads {list(heads)} do not fit width {dim}")
    direct = "conv_last.weight" not in state
    if direct:
        out = take(state, "upsample.0.weight", 4).shape[0]
        scale = math.isqrt(out // 3)
        if scale * scale * 3 != out:
            raise ArchError(f"upsample.0 has {out} output channels; expected 3 * scale**2")
    else:
        scale, i = 1, 0
        while f"upsample.{i}.weight" in state:
            scale *= _factor(take(state, f"upsample.{i}.weight", 4))
            i += 2
    for i, d in enumerate(depth):
        for j in range(0, d, 2):
            for k, (wh, ww) in enumerate((split, split[::-1])):
                name = f"layers.{i}.blocks.{j}.attn.attns.{k}"
                weights[f"{name}.bias"] = _position_bias(weights, f"{name}.pos", wh, ww)
    return DAT(
        weights, scale=scale, depth=depth, heads=heads, split=split, direct=direct,  # type: ignore[arg-type]
        three_conv="conv_after_body.weight" not in state,
    )  # fmt: skip

"""DAT and OmniSR upscaler files for tests: random weights under the exact key names and shapes the
published checkpoints have (DAT's DAT_x4 / DAT_S_x3 / DAT_2_x2 / DAT_light_x4 from the DAT repository's
training code, saved under ``params``; OmniSR's OmniSR_X4_DIV2K with the thop counters ``total_ops`` /
``total_params`` its files carry), including the buffers the published code saves (``rpe_biases``,
``relative_position_index``, the 64 px ``attn_mask_*``, BatchNorm's ``num_batches_tracked``). Written
from the architectures' definitions, not from our loaders, so spandrel's strict load checks the layout."""

from __future__ import annotations

import math
from functools import cache

import torch
from torch import Tensor

# name -> (embed_dim, depths, heads, split, expansion, upsampler, resi_connection, scale)
DAT_VARIANTS: dict[str, tuple[int, list[int], list[int], tuple[int, int], float, str, str, int]] = {
    "DAT_x4": (180, [6] * 6, [6] * 6, (8, 32), 4.0, "pixelshuffle", "1conv", 4),
    "DAT_S_x3": (180, [6] * 6, [6] * 6, (8, 16), 2.0, "pixelshuffle", "1conv", 3),
    "DAT_2_x2": (180, [6] * 6, [6] * 6, (8, 32), 2.0, "pixelshuffle", "1conv", 2),
    "DAT_light_x4": (60, [18], [6], (8, 32), 2.0, "pixelshuffledirect", "3conv", 4),
}


class _Rand:
    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.state: dict[str, Tensor] = {}

    def uniform(self, shape: tuple[int, ...], bound: float) -> Tensor:
        return (torch.rand(*shape, generator=self.g) * 2 - 1) * bound

    def conv(self, key: str, out_c: int, in_c: int, k: int = 3, bias: bool = True, groups: int = 1) -> None:
        bound = 1 / math.sqrt(in_c // groups * k * k)  # torch's default init range
        self.state[f"{key}.weight"] = self.uniform((out_c, in_c // groups, k, k), bound)
        if bias:
            self.state[f"{key}.bias"] = self.uniform((out_c,), bound)

    def linear(self, key: str, out_f: int, in_f: int, bias: bool = True) -> None:
        bound = 1 / math.sqrt(in_f)
        self.state[f"{key}.weight"] = self.uniform((out_f, in_f), bound)
        if bias:
            self.state[f"{key}.bias"] = self.uniform((out_f,), bound)

    def norm(self, key: str, c: int) -> None:
        self.state[f"{key}.weight"] = 1 + 0.1 * torch.randn(c, generator=self.g)
        self.state[f"{key}.bias"] = 0.1 * torch.randn(c, generator=self.g)

    def batch_norm(self, key: str, c: int) -> None:
        self.norm(key, c)
        self.state[f"{key}.running_mean"] = 0.1 * torch.randn(c, generator=self.g)
        self.state[f"{key}.running_var"] = 0.5 + torch.rand(c, generator=self.g)
        self.state[f"{key}.num_batches_tracked"] = torch.tensor(1000)


@cache
def _window_buffers(wh: int, ww: int) -> tuple[Tensor, Tensor]:
    """DAT's ``rpe_biases`` (every offset (dy, dx), dy-major) and ``relative_position_index`` (for
    tokens p, q of a window in row-major order: the row of offset p - q), by plain loops."""
    rows = [(float(dy), float(dx)) for dy in range(1 - wh, wh) for dx in range(1 - ww, ww)]
    tokens = [(y, x) for y in range(wh) for x in range(ww)]
    index = [[(p[0] - q[0] + wh - 1) * (2 * ww - 1) + (p[1] - q[1] + ww - 1) for q in tokens] for p in tokens]
    return torch.tensor(rows), torch.tensor(index)


def _region(i: int, size: int, window: int, shift: int) -> int:
    return 0 if i < size - window else (1 if i < size - shift else 2)


@cache
def _shift_mask(size: int, wh: int, ww: int) -> Tensor:
    """The published code's ``attn_mask`` for a size x size image: -100 between tokens of one window
    from different regions of the shifted image, 0 otherwise; windows row-major."""
    sh, sw = wh // 2, ww // 2
    out = torch.zeros((size // wh) * (size // ww), wh * ww, wh * ww)
    for n, (by, bx) in enumerate((by, bx) for by in range(size // wh) for bx in range(size // ww)):
        label = [
            3 * _region(by * wh + y, size, wh, sh) + _region(bx * ww + x, size, ww, sw)
            for y in range(wh)
            for x in range(ww)
        ]
        lab = torch.tensor(label)
        out[n] = torch.where(lab[None, :] != lab[:, None], -100.0, 0.0)
    return out


def dat(name: str, seed: int = 0, img_size: int = 64, groups: list[int] | None = None) -> dict[str, Tensor]:
    """One of :data:`DAT_VARIANTS`' layouts with random weights; ``groups``: fewer residual groups / blocks
    than the published model (each block shaped as published), for tests that run many windows."""
    dim, depths, heads, split, ef, upsampler, resi, scale = DAT_VARIANTS[name]
    if groups is not None:
        depths, heads = groups, [heads[0]] * len(groups)
    r = _Rand(seed)
    r.conv("conv_first", dim, 3)
    r.norm("before_RG.1", dim)
    hidden = int(dim * ef)
    pos_dim = (dim // 2 // 4) // 4

    def resi_conv(key: str) -> None:
        if resi == "1conv":
            r.conv(key, dim, dim)
        else:
            r.conv(f"{key}.0", dim // 4, dim)
            r.conv(f"{key}.2", dim // 4, dim // 4, 1)
            r.conv(f"{key}.4", dim, dim // 4)

    for i, (depth, nh) in enumerate(zip(depths, heads, strict=True)):
        for j in range(depth):
            b = f"layers.{i}.blocks.{j}"
            r.norm(f"{b}.norm1", dim)
            r.norm(f"{b}.norm2", dim)
            r.linear(f"{b}.attn.qkv", 3 * dim, dim)
            r.linear(f"{b}.attn.proj", dim, dim)
            if j % 2 == 0:
                shifted = (i % 2 == 0 and j > 0 and (j - 2) % 4 == 0) or (i % 2 == 1 and j % 4 == 0)
                for k, (wh, ww) in enumerate((split, split[::-1])):
                    a = f"{b}.attn.attns.{k}"
                    rpe, index = _window_buffers(wh, ww)
                    r.state[f"{a}.rpe_biases"], r.state[f"{a}.relative_position_index"] = (
                        rpe.clone(),
                        index.clone(),
                    )
                    r.linear(f"{a}.pos.pos_proj", pos_dim, 2)
                    for p in (1, 2, 3):
                        r.norm(f"{a}.pos.pos{p}.0", pos_dim)
                        r.linear(f"{a}.pos.pos{p}.2", nh // 2 if p == 3 else pos_dim, pos_dim)
                    if shifted:
                        r.state[f"{b}.attn.attn_mask_{k}"] = _shift_mask(img_size, wh, ww).clone()
            else:
                r.state[f"{b}.attn.temperature"] = 0.5 + torch.rand(nh, 1, 1, generator=r.g)
            r.conv(f"{b}.attn.dwconv.0", dim, dim, groups=dim)
            r.batch_norm(f"{b}.attn.dwconv.1", dim)
            r.conv(f"{b}.attn.channel_interaction.1", dim // 8, dim, 1)
            r.batch_norm(f"{b}.attn.channel_interaction.2", dim // 8)
            r.conv(f"{b}.attn.channel_interaction.4", dim, dim // 8, 1)
            r.conv(f"{b}.attn.spatial_interaction.0", dim // 16, dim, 1)
            r.batch_norm(f"{b}.attn.spatial_interaction.1", dim // 16)
            r.conv(f"{b}.attn.spatial_interaction.3", 1, dim // 16, 1)
            r.linear(f"{b}.ffn.fc1", hidden, dim)
            r.norm(f"{b}.ffn.sg.norm", hidden // 2)
            r.conv(f"{b}.ffn.sg.conv", hidden // 2, hidden // 2, groups=hidden // 2)
            r.linear(f"{b}.ffn.fc2", dim, hidden // 2)
        resi_conv(f"layers.{i}.conv")
    r.norm("norm", dim)
    resi_conv("conv_after_body")
    if upsampler == "pixelshuffle":
        r.conv("conv_before_upsample.0", 64, dim)
        steps = [3] if scale == 3 else [2] * int(math.log2(scale))
        for n, f in enumerate(steps):
            r.conv(f"upsample.{2 * n}", f * f * 64, 64)
        r.conv("conv_last", 3, 64)
        last = "conv_last"
    else:
        r.conv("upsample.0", 3 * scale * scale, dim)
        last = "upsample.0"
    # random weights put the output far outside 0..1; scaled so most pixels stay unclamped (compared)
    r.state[f"{last}.weight"] *= 1.0
    r.state[f"{last}.bias"] = 0.05 * r.state[f"{last}.bias"] + 0.1
    return r.state


def omnisr(
    nf: int = 64,
    res_num: int = 5,
    block_num: int = 1,
    window: int = 8,
    scale: int = 4,
    seed: int = 0,
    pe: bool = True,
) -> dict[str, Tensor]:
    """OmniSR_X4_DIV2K.safetensors' layout (64 features, 5 OSAGs of 1 OSA block, 8 px windows with
    position bias, biases on), with the thop counters the published files carry."""
    r = _Rand(seed)
    r.conv("input", nf, 3)
    heads, f = 4, max(nf // 4, 16)
    for g in range(res_num):
        og = f"residual_layer.{g}"
        for b in range(block_num):
            lay = f"{og}.residual_layer.{b}.layer"
            r.conv(f"{lay}.0.fn.0", nf, nf, 1)
            r.conv(f"{lay}.0.fn.2", nf, nf, groups=nf)
            r.linear(f"{lay}.0.fn.4.gate.1", int(nf * 0.25), nf, bias=False)
            r.linear(f"{lay}.0.fn.4.gate.3", nf, int(nf * 0.25), bias=False)
            r.conv(f"{lay}.0.fn.5", nf, nf, 1)
            for a in (2, 8):  # block-like and grid-like window attention
                r.norm(f"{lay}.{a}.norm", nf)
                r.linear(f"{lay}.{a}.fn.to_qkv", 3 * nf, nf, bias=False)
                if pe:  # with_pe=False models have no position bias table
                    r.state[f"{lay}.{a}.fn.rel_pos_bias.weight"] = torch.randn(
                        (2 * window - 1) ** 2, heads, generator=r.g
                    )
                r.linear(f"{lay}.{a}.fn.to_out.0", nf, nf, bias=False)
            for ff in (4, 6, 10, 12):  # gated conv feed-forwards
                r.norm(f"{lay}.{ff}.norm", nf)
                r.conv(f"{lay}.{ff}.fn.project_in", 2 * nf, nf, 1, bias=False)
                r.conv(f"{lay}.{ff}.fn.dwconv", 2 * nf, 2 * nf, bias=False, groups=2 * nf)
                r.conv(f"{lay}.{ff}.fn.project_out", nf, nf, 1, bias=False)
            for ca in (5, 11):  # channel attention inside windows, and across them
                r.norm(f"{lay}.{ca}.norm", nf)
                r.state[f"{lay}.{ca}.fn.temperature"] = 0.5 + torch.rand(heads, 1, 1, generator=r.g)
                r.conv(f"{lay}.{ca}.fn.qkv", 3 * nf, nf, 1, bias=False)
                r.conv(f"{lay}.{ca}.fn.qkv_dwconv", 3 * nf, 3 * nf, bias=False, groups=3 * nf)
                r.conv(f"{lay}.{ca}.fn.project_out", nf, nf, 1, bias=False)
        r.conv(f"{og}.residual_layer.{block_num}", nf, nf, 1)
        r.conv(f"{og}.esa.conv1", f, nf, 1)
        r.conv(f"{og}.esa.conv_f", f, f, 1)
        r.conv(f"{og}.esa.conv2", f, f)
        r.conv(f"{og}.esa.conv3", f, f)
        r.conv(f"{og}.esa.conv4", nf, f, 1)
    r.conv("output", nf, nf)
    r.conv("up.0", 3 * scale * scale, nf)
    r.state["up.0.weight"] *= 0.6
    r.state["up.0.bias"] = 0.05 * r.state["up.0.bias"] + 0.5
    # thop's profile() counters, left in the published files (spandrel drops them)
    for key in ("total_ops", "total_params", "input.total_ops", "input.total_params", "up.0.total_ops"):
        r.state[key] = torch.zeros(1, dtype=torch.float64)
    return r.state

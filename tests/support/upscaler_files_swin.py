"""SwinIR and HAT files for tests: random weights under the published checkpoints' exact key names and
shapes (the keys of JingyunLiang/SwinIR's released ``.pth`` files and XPixelGroup/HAT's, both saved from
their nn.Module trees, buffers included: ``relative_position_index``, ``attn_mask`` of the shifted
blocks, HAT's ``relative_position_index_SA`` / ``_OCA``), small dimensions. spandrel loads these files
strictly, so a missing or extra key fails its load as well as ours.

Each buffer is built here from its definition in the papers' code (not from the service's code), so
the comparison with spandrel, which uses the buffers as stored, also checks the service's own indices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .upscaler_files import _put


def _conv(g: torch.Generator, out_c: int, in_c: int, k: int = 3, gain: float = 1.0) -> tuple[Tensor, Tensor]:
    """Variance-preserving random convs (std 1/sqrt(fan_in)): with torch's default init (a third of
    that variance) a deep random net's output is a near-constant grey, which would hide errors."""
    w = torch.randn(out_c, in_c, k, k, generator=g) * gain / math.sqrt(in_c * k * k)
    return w, torch.randn(out_c, generator=g) * 0.05


LAST_GAIN = 0.15
MLP_RATIO = 2.0  # every published SwinIR and HAT model's


def _linear(g: torch.Generator, out_f: int, in_f: int, std: float = 0.2) -> tuple[Tensor, Tensor]:
    # larger than the trunc_normal(0.02) init of a fresh net: trained attention is far from uniform
    return torch.randn(out_f, in_f, generator=g) * std / math.sqrt(in_f) * 4, torch.randn(
        out_f, generator=g
    ) * 0.05


def _norm(g: torch.Generator, dim: int) -> tuple[Tensor, Tensor]:
    return 1 + 0.1 * torch.randn(dim, generator=g), 0.05 * torch.randn(dim, generator=g)


def _rpi(ws: int) -> Tensor:
    """Swin's relative_position_index: (dy + ws - 1) * (2ws - 1) + (dx + ws - 1) for tokens i, j."""
    i = torch.arange(ws * ws)[:, None]
    j = torch.arange(ws * ws)[None, :]
    dy, dx = i // ws - j // ws, i % ws - j % ws
    return (dy + ws - 1) * (2 * ws - 1) + (dx + ws - 1)


def _rpi_oca(ws: int, ows: int) -> Tensor:
    """HAT's calculate_rpi_oca: query (y, x) in the ws window, key (y', x') in the ows window;
    (y' - y + ws - ows + 1) * (ws + ows - 1) + (x' - x + ws - ows + 1)."""
    i = torch.arange(ws * ws)[:, None]
    j = torch.arange(ows * ows)[None, :]
    dy, dx = j // ows - i // ws + ws - ows + 1, j % ows - i % ws + ws - ows + 1
    return dy * (ws + ows - 1) + dx


def _attn_mask(size: int, ws: int) -> Tensor:
    """SwinTransformerBlock.calculate_mask for an img_size x img_size input (the buffer the shifted
    blocks of a SwinIR file store): regions by the roll's edges, -100 across regions."""
    shift = ws // 2
    label = torch.zeros(size, size)
    for y in range(size):
        for x in range(size):
            ry = 0 if y < size - ws else (1 if y < size - shift else 2)
            rx = 0 if x < size - ws else (1 if x < size - shift else 2)
            label[y, x] = 3 * ry + rx
    n = size // ws
    wins = label.view(n, ws, n, ws).permute(0, 2, 1, 3).reshape(n * n, ws * ws)
    return torch.where(wins[:, None, :] != wins[:, :, None], -100.0, 0.0)


def _swin_block(
    state: dict[str, Tensor], g: torch.Generator, p: str, dim: int, heads: int, ws: int, mlp: int
) -> None:
    _put(state, f"{p}.norm1", _norm(g, dim))
    state[f"{p}.attn.relative_position_bias_table"] = torch.randn((2 * ws - 1) ** 2, heads, generator=g) * 0.5
    _put(state, f"{p}.attn.qkv", _linear(g, 3 * dim, dim))
    _put(state, f"{p}.attn.proj", _linear(g, dim, dim))
    _put(state, f"{p}.norm2", _norm(g, dim))
    _put(state, f"{p}.mlp.fc1", _linear(g, mlp, dim))
    _put(state, f"{p}.mlp.fc2", _linear(g, dim, mlp))


def _resi(state: dict[str, Tensor], g: torch.Generator, p: str, dim: int, kind: str) -> None:
    if kind == "1conv":
        _put(state, p, _conv(g, dim, dim))
    elif kind == "3conv":
        _put(state, f"{p}.0", _conv(g, dim // 4, dim))
        _put(state, f"{p}.2", _conv(g, dim // 4, dim // 4, 1))
        _put(state, f"{p}.4", _conv(g, dim, dim // 4))


def _last(g: torch.Generator, c_in: int) -> tuple[Tensor, Tensor]:
    # the net adds the image mean back: outputs of std ~0.15 around it stay mostly inside 0..1
    return _conv(g, 3, c_in, gain=LAST_GAIN)


@dataclass(frozen=True)
class Dims:
    """The sizes SwinIR and HAT files share: embed dim, blocks per residual group, heads, window side."""

    embed: int = 24
    depths: tuple[int, ...] = (2,)
    heads: int = 2
    window: int = 8


def swinir(
    dims: Dims = Dims(),
    *,
    scale: int = 4,
    upsampler: str = "pixelshuffle",
    resi: str = "1conv",
    img_size: int = 32,
    seed: int = 0,
    unshuffle: int = 1,
) -> dict[str, Tensor]:
    """A SwinIR state dict. The published ones: classical SR ``upsampler="pixelshuffle"`` (embed 180,
    depths 6x6, heads 6, window 8, img_size 48/64, 1conv), lightweight ``"pixelshuffledirect"`` (embed
    60, depths 6x4), real-world ``"nearest+conv"`` (x4: conv_up1, conv_up2; large: 3conv), denoise /
    JPEG ``""`` (scale 1; JPEG: window 7). num_feat of the upsamplers is always 64 (fixed in SwinIR)."""
    embed, depths, heads, window = dims.embed, dims.depths, dims.heads, dims.window
    g = torch.Generator().manual_seed(seed)
    state: dict[str, Tensor] = {}
    nf = 64
    # unshuffle > 1 (traiNNer-style files): conv_first is nn.Sequential(PixelUnshuffle(u), Conv2d)
    _put(state, "conv_first.1" if unshuffle > 1 else "conv_first", _conv(g, embed, 3 * unshuffle**2))
    _put(state, "patch_embed.norm", _norm(g, embed))
    mlp = int(embed * MLP_RATIO)
    for i, depth in enumerate(depths):
        for j in range(depth):
            p = f"layers.{i}.residual_group.blocks.{j}"
            _swin_block(state, g, p, embed, heads, window, mlp)
            state[f"{p}.attn.relative_position_index"] = _rpi(window)
            if j % 2 == 1:
                state[f"{p}.attn_mask"] = _attn_mask(img_size, window)
        _resi(state, g, f"layers.{i}.conv", embed, resi)
    _put(state, "norm", _norm(g, embed))
    _resi(state, g, "conv_after_body", embed, resi)
    if upsampler == "pixelshuffle":
        _put(state, "conv_before_upsample.0", _conv(g, nf, embed))
        if scale == 3:
            _put(state, "upsample.0", _conv(g, 9 * nf, nf))
        for k in range(int(math.log2(scale)) if scale != 3 else 0):
            _put(state, f"upsample.{2 * k}", _conv(g, 4 * nf, nf))
        _put(state, "conv_last", _last(g, nf))
    elif upsampler == "pixelshuffledirect":
        _put(state, "upsample.0", _conv(g, 3 * scale * scale, embed, gain=LAST_GAIN))
    elif upsampler == "nearest+conv":
        _put(state, "conv_before_upsample.0", _conv(g, nf, embed))
        for k in range(1, int(math.log2(scale)) + 1):
            _put(state, f"conv_up{k}", _conv(g, nf, nf))
        _put(state, "conv_hr", _conv(g, nf, nf))
        _put(state, "conv_last", _conv(g, 3, nf, gain=2 * LAST_GAIN))  # after two LeakyReLUs: weaker
    else:  # a residual on the input; the JPEG models (window 7) divide it by img_range 255
        _put(state, "conv_last", _conv(g, 3, embed, gain=LAST_GAIN * (3 if window == 7 else 1)))
    return state


def hat(
    dims: Dims = Dims(30, heads=3),
    *,
    overlap_ratio: float = 0.5,
    cab: tuple[int, int] = (3, 30),
    scale: int = 4,
    num_feat: int = 64,
) -> dict[str, Tensor]:
    """A HAT state dict. The published ones: HAT (embed 180, depths 6x6, heads 6, window 16, the CAB's
    (compress ratio, squeeze factor) ``cab=(3, 30)``), HAT-S (embed 144, ``cab=(24, 24)``), HAT-L
    (depths 6x12); overlap 0.5, mlp 2, num_feat 64, pixelshuffle, 1conv after the body and each group."""
    embed, depths, heads, window = dims.embed, dims.depths, dims.heads, dims.window
    g = torch.Generator().manual_seed(1)
    state: dict[str, Tensor] = {}
    ows = window + int(window * overlap_ratio)
    state["relative_position_index_SA"] = _rpi(window)
    state["relative_position_index_OCA"] = _rpi_oca(window, ows)
    _put(state, "conv_first", _conv(g, embed, 3))
    _put(state, "patch_embed.norm", _norm(g, embed))
    mlp = int(embed * MLP_RATIO)
    for i, depth in enumerate(depths):
        r = f"layers.{i}.residual_group"
        for j in range(depth):
            p = f"{r}.blocks.{j}"
            _swin_block(state, g, p, embed, heads, window, mlp)
            mid, sq = embed // cab[0], embed // cab[1]  # (compress ratio, squeeze factor)
            _put(state, f"{p}.conv_block.cab.0", _conv(g, mid, embed))
            _put(state, f"{p}.conv_block.cab.2", _conv(g, embed, mid))
            _put(state, f"{p}.conv_block.cab.3.attention.1", _conv(g, sq, embed, 1))
            _put(state, f"{p}.conv_block.cab.3.attention.3", _conv(g, embed, sq, 1))
        o = f"{r}.overlap_attn"
        _put(state, f"{o}.norm1", _norm(g, embed))
        _put(state, f"{o}.qkv", _linear(g, 3 * embed, embed))
        state[f"{o}.relative_position_bias_table"] = (
            torch.randn((window + ows - 1) ** 2, heads, generator=g) * 0.5
        )
        _put(state, f"{o}.proj", _linear(g, embed, embed))
        _put(state, f"{o}.norm2", _norm(g, embed))
        _put(state, f"{o}.mlp.fc1", _linear(g, mlp, embed))
        _put(state, f"{o}.mlp.fc2", _linear(g, embed, mlp))
        _put(state, f"layers.{i}.conv", _conv(g, embed, embed))
    _put(state, "norm", _norm(g, embed))
    _put(state, "conv_after_body", _conv(g, embed, embed))
    _put(state, "conv_before_upsample.0", _conv(g, num_feat, embed))
    for k in range(int(math.log2(scale))):
        _put(state, f"upsample.{2 * k}", _conv(g, 4 * num_feat, num_feat))
    _put(state, "conv_last", _last(g, num_feat))
    return state

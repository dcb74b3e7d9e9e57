"""SwinIR (arXiv 2108.10257) in the published checkpoints' layout (``001_classicalSR_DF2K_s64w8_SwinIR-M_x4``,
``002_lightweightSR_DIV2K_s64w8_SwinIR-S_x4``, ``003_realSR_BSRGAN_DFO_s64w8_SwinIR-M/L_x4_GAN``, the
denoising / JPEG ones, and the community files trained with the same code), usually under ``params`` or
``params_ema``.

Read from the keys, as spandrel reads them: embed dim (``conv_first``), residual groups ``layers.{i}``
and their depths (``residual_group.blocks.{j}``), heads (bias table columns), window size (the bias
table's (2ws-1)**2 rows), MLP width, ``resi_connection`` 1conv (``conv_after_body``) or 3conv
(``conv_after_body.0/2/4``), and the upsampler:
- ``pixelshuffle`` (classical SR): ``conv_before_upsample.0``, ``upsample.{0,2,..}`` convs + pixel
  shuffle, ``conv_last``;
- ``pixelshuffledirect`` (lightweight SR): one conv ``upsample.0`` to 3*scale**2 channels + shuffle;
- ``nearest+conv`` (real-world SR): ``conv_before_upsample.0``, per 2x a nearest upsample and
  ``conv_up{k}`` (LeakyReLU 0.2), ``conv_hr``, ``conv_last``;
- none (denoising, JPEG artefacts; scale 1): the input plus ``conv_last`` of the features.
img_range 255 for window 7 (the JPEG models, the only window-7 ones), else 1, as spandrel assumes.
A ``conv_first.1`` (nn.Sequential(PixelUnshuffle(u), Conv2d), community 1x / 2x files) unshuffles the
padded input by u first; the scale is the upsampler's over u, and the input is padded to window * u.

Each Swin block: x + W-MSA(LN(x)) (odd blocks: windows shifted by ws/2, masked), then x + MLP(LN(x));
each group ends with its conv over the image of its tokens, plus the group's input.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from .nets import ArchError, StateDict, take
from .ops import layer_norm
from .swin import WindowNet, checked_scale, groups, keep, pixelshuffle_stages, rgb_embed, swin_bias, window_of

BLOCK0 = "layers.0.residual_group.blocks.0"
KEYS = (f"{BLOCK0}.norm1.weight", f"{BLOCK0}.mlp.fc1.bias", f"{BLOCK0}.attn.relative_position_index")
SWIN2SR_KEY = "patch_embed.proj.weight"  # Swin2SR (SwinV2 blocks) has these keys too, and this one
UNSHUFFLED_KEY = "conv_first.1.weight"  # a pixel-unshuffled input (community 1x / 2x files): conv_first.1


def detect(state: StateDict) -> bool:
    first = "conv_first.weight" in state or UNSHUFFLED_KEY in state
    return first and all(k in state for k in KEYS) and SWIN2SR_KEY not in state


def _upsampler(state: StateDict) -> str:
    if "conv_before_upsample.0.weight" in state:
        return "nearest+conv" if "conv_up1.weight" in state else "pixelshuffle"
    return "pixelshuffledirect" if "upsample.0.weight" in state else ""


class SwinIR(WindowNet):
    arch = "SwinIR"
    family = "SwinIR"
    upsampler = ""
    stages: tuple[int, ...] = ()  # pixelshuffle: the factor of each upsample conv

    def group(self, t: Tensor, i: int, h: int, w: int) -> Tensor:
        b, _, c = t.shape
        start = t
        for j in range(self.depths[i]):
            p = f"layers.{i}.residual_group.blocks.{j}"
            y = layer_norm(t, self.w, f"{p}.norm1").view(b, h, w, c)
            t = t + self.window_attn(y, f"{p}.attn", self.heads[i], shifted=j % 2 == 1).reshape(b, h * w, c)
            t = t + self.mlp(layer_norm(t, self.w, f"{p}.norm2"), f"{p}.mlp")
        image = t.transpose(1, 2).reshape(b, c, h, w)
        return self.after_body(image, f"layers.{i}.conv").flatten(2).transpose(1, 2) + start

    def tail(self, body: Tensor, x: Tensor) -> Tensor:
        if self.upsampler == "pixelshuffle":
            return self.shuffle_up(body, self.stages)
        if self.upsampler == "pixelshuffledirect":
            return F.pixel_shuffle(self.conv(body, "upsample.0"), self.scale)
        if self.upsampler == "nearest+conv":
            y = F.leaky_relu(self.conv(body, "conv_before_upsample.0"), 0.01)
            for k in range(1, len(self.stages) + 1):
                y = F.leaky_relu(
                    self.conv(F.interpolate(y, scale_factor=2.0, mode="nearest"), f"conv_up{k}"), 0.2
                )
            return self.conv(F.leaky_relu(self.conv(y, "conv_hr"), 0.2), "conv_last")
        return x + self.conv(body, "conv_last")


def _unshuffled(state: StateDict) -> tuple[StateDict, int]:
    """A file with ``conv_first.1`` (nn.Sequential(PixelUnshuffle(u), Conv2d)): its conv as
    ``conv_first`` and u, read from the conv's 3 * u**2 input channels; otherwise (state, 1)."""
    if UNSHUFFLED_KEY not in state:
        return state, 1
    first = take(state, UNSHUFFLED_KEY, 4)
    u = math.isqrt(first.shape[1] // 3)
    if u < 2 or 3 * u * u != first.shape[1] or _upsampler(state) == "":
        raise ArchError(f"conv_first.1 takes {first.shape[1]} channels; expected 3 * u**2 and an upsampler")
    renamed = {k: v for k, v in state.items() if not k.startswith("conv_first.1.")}
    renamed["conv_first.weight"], renamed["conv_first.bias"] = first, take(state, "conv_first.1.bias", 1)
    return renamed, u


def load(state: StateDict) -> SwinIR:
    state, unshuffle = _unshuffled(state)
    embed = take(state, "conv_first.weight", 4).shape[0] if unshuffle > 1 else rgb_embed(state)
    ws = window_of(state, f"{BLOCK0}.attn.relative_position_bias_table")
    depths, heads = groups(state, "residual_group.blocks.0.attn.relative_position_bias_table", embed)
    weights: dict[str, Tensor] = {}
    keep(state, weights, "conv_first", "norm")
    keep(state, weights, "patch_embed.norm", optional=True)
    for i, depth in enumerate(depths):
        for j in range(depth):
            p = f"layers.{i}.residual_group.blocks.{j}"
            keep(state, weights, f"{p}.norm1", f"{p}.norm2", f"{p}.mlp.fc1", f"{p}.mlp.fc2")
            keep(state, weights, f"{p}.attn.qkv", f"{p}.attn.proj")
            swin_bias(state, weights, f"{p}.attn", ws)
        keep(state, weights, f"layers.{i}.conv")
    keep(state, weights, "conv_after_body")
    upsampler = _upsampler(state)
    stages: tuple[int, ...] = ()
    if upsampler == "pixelshuffle":
        stages = tuple(pixelshuffle_stages(state))
        keep(state, weights, "conv_before_upsample.0", "upsample", "conv_last")
        scale = math.prod(stages)
    elif upsampler == "pixelshuffledirect":
        keep(state, weights, "upsample.0")
        scale = math.isqrt(weights["upsample.0.weight"].shape[0] // 3)
        if 3 * scale * scale != weights["upsample.0.weight"].shape[0]:
            raise ArchError(
                f"upsample.0 gives {weights['upsample.0.weight'].shape[0]} channels; expected 3 * scale**2"
            )
    elif upsampler == "nearest+conv":
        ups = sum(1 for k in state if k.startswith("conv_up") and k.endswith(".weight"))
        stages = (2,) * ups
        keep(state, weights, "conv_before_upsample.0", "conv_hr", "conv_last")
        keep(state, weights, *(f"conv_up{k}" for k in range(1, ups + 1)))
        scale = 2**ups
    else:
        keep(state, weights, "conv_last")
        scale = 1
    if scale % unshuffle:
        raise ArchError(f"an upscale of {scale} after a {unshuffle}x unshuffle")
    return SwinIR(
        weights, scale=checked_scale(scale // unshuffle), window=ws, depths=depths, heads=heads,
        upsampler=upsampler, stages=stages, img_range=255.0 if ws == 7 else 1.0, unshuffle=unshuffle,
        align=unshuffle,
    )  # fmt: skip

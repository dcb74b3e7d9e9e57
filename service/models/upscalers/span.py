"""SPAN (Swift Parameter-free Attention Network; the "4x*_span" community models), in spandrel's
layout: ``conv_1``, ``block_{1..6}.c{1,2,3}_r``, ``conv_2`` are Conv3XC units (a 1x1 skip ``sk`` beside
a 1x1 -> 3x3 -> 1x1 chain ``conv.0/1/2``) which inference fuses into one 3x3 convolution, as spandrel's
eval mode does (a stored ``eval_conv`` is recomputed, not trusted); ``conv_cat`` (1x1 over four feature
maps) and ``upsampler.0`` (conv + pixel shuffle). Input normalised as (x - mean) * 255 unless the file
has ``no_norm``.

Each block: three fused convs (SiLU between), att = sigmoid(out3) - 0.5, out = (out3 + x) * att; the
sixth block's first conv output (after its SiLU, which the published code applies in place) feeds
``conv_cat`` together with the first conv's features, the sixth block (through ``conv_2``) and the first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .nets import ArchError, Net, StateDict, take

KEYS = (
    "conv_1.sk.weight",
    "block_1.c1_r.sk.weight",
    "block_1.c1_r.eval_conv.weight",
    "block_1.c3_r.eval_conv.weight",
    "conv_cat.weight",
    "conv_2.sk.weight",
    "conv_2.eval_conv.weight",
    "upsampler.0.weight",
)
RGB_MEAN = (0.4488, 0.4371, 0.4040)
UNITS = ["conv_1", "conv_2"] + [f"block_{b}.c{c}_r" for b in range(1, 7) for c in range(1, 4)]


def detect(state: StateDict) -> bool:
    return all(k in state for k in KEYS)


def _fuse(state: StateDict, unit: str) -> tuple[Tensor, Tensor]:
    """Conv3XC's 1x1 -> 3x3 -> 1x1 chain plus its 1x1 skip as one 3x3 kernel and bias."""
    w1, b1 = take(state, f"{unit}.conv.0.weight", 4)[:, :, 0, 0], take(state, f"{unit}.conv.0.bias", 1)
    w2, b2 = take(state, f"{unit}.conv.1.weight", 4), take(state, f"{unit}.conv.1.bias", 1)
    w3, b3 = take(state, f"{unit}.conv.2.weight", 4)[:, :, 0, 0], take(state, f"{unit}.conv.2.bias", 1)
    sk, skb = take(state, f"{unit}.sk.weight", 4), take(state, f"{unit}.sk.bias", 1)
    w12 = torch.einsum("bakl,ai->bikl", w2.double(), w1.double())
    weight = torch.einsum("ob,bikl->oikl", w3.double(), w12)
    weight[:, :, 1, 1] += sk[:, :, 0, 0].double()
    mid = torch.einsum("bakl,a->b", w2.double(), b1.double()) + b2.double()
    bias = w3.double() @ mid + b3.double() + skb.double()
    return weight.float(), bias.float()


class SPAN(Net):
    arch = "SPAN"
    family = "SPAN"
    norm = True  # (x - mean) * 255 first

    def forward(self, x: Tensor) -> Tensor:
        if self.norm:
            mean = torch.tensor(RGB_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            x = (x - mean) * 255.0
        feat = self.conv(x, "conv_1")
        out, b1, first6 = feat, None, None
        for b in range(1, 7):
            out, c1 = self._block(out, f"block_{b}")
            b1 = out if b == 1 else b1
            first6 = c1
        assert b1 is not None and first6 is not None
        out = self.conv(torch.cat([feat, self.conv(out, "conv_2"), b1, first6], 1), "conv_cat")
        return F.pixel_shuffle(self.conv(out, "upsampler.0"), self.scale)

    def _block(self, x: Tensor, name: str) -> tuple[Tensor, Tensor]:
        out1 = F.silu(self.conv(x, f"{name}.c1_r"))
        out3 = self.conv(F.silu(self.conv(out1, f"{name}.c2_r")), f"{name}.c3_r")
        return (out3 + x) * (torch.sigmoid(out3) - 0.5), out1


def load(state: StateDict) -> SPAN:
    weights: dict[str, Tensor] = {}
    for unit in UNITS:
        weights[f"{unit}.weight"], weights[f"{unit}.bias"] = _fuse(state, unit)
    for name in ("conv_cat", "upsampler.0"):
        weights[f"{name}.weight"] = take(state, f"{name}.weight", 4)
        weights[f"{name}.bias"] = take(state, f"{name}.bias", 1)
    in_nc, channels = weights["conv_1.weight"].shape[1], weights["upsampler.0.weight"].shape[0]
    scale = int(round((channels / 3) ** 0.5))
    if in_nc != 3 or scale * scale * 3 != channels:
        raise ArchError(
            f"{in_nc} input channels and {channels} upsampler channels; expected RGB, 3 * scale**2"
        )
    return SPAN(weights, scale=scale, norm="no_norm" not in state)

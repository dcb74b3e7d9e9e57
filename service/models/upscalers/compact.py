"""Real-ESRGAN's compact network (SRVGGNetCompact: realesr-general-x4v3, realesr-animevideov3, the
many community "compact" models), key layout ``body.{i}``: conv, PReLU, (conv, PReLU) x num_conv,
conv to out_nc * scale**2 channels, pixel shuffle, plus the nearest-upsampled input (the net learns
the residual). The scale comes from the last conv's channel count."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from .nets import ArchError, Net, StateDict, seq_len, take


def detect(state: StateDict) -> bool:
    return "body.0.weight" in state and "body.1.weight" in state


class Compact(Net):
    arch = "Compact"
    family = "RealESRGAN"
    layers = 3  # body.0 .. body.{layers-1}

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for i in range(0, self.layers - 1, 2):
            out = F.prelu(self.conv(out, f"body.{i}"), self.w[f"body.{i + 1}.weight"])
        out = F.pixel_shuffle(self.conv(out, f"body.{self.layers - 1}"), self.scale)
        return out + F.interpolate(x, scale_factor=float(self.scale), mode="nearest")


def load(state: StateDict) -> Compact:
    layers = seq_len(state, "body")  # conv, prelu, ..., conv: an odd count
    if layers < 3 or layers % 2 == 0:
        raise ArchError(f"{layers} body layers; a compact net has conv/PReLU pairs and a last conv")
    weights: dict[str, Tensor] = {}
    for i in range(0, layers, 2):
        weights[f"body.{i}.weight"] = take(state, f"body.{i}.weight", 4)
        weights[f"body.{i}.bias"] = take(state, f"body.{i}.bias", 1)
        if i + 1 < layers:
            weights[f"body.{i + 1}.weight"] = take(state, f"body.{i + 1}.weight", 1)
    in_nc = weights["body.0.weight"].shape[1]
    last = weights[f"body.{layers - 1}.weight"].shape[0]
    if in_nc != 3 or last % 3 or math.isqrt(last // 3) ** 2 != last // 3:
        raise ArchError(
            f"{in_nc} input channels and {last} last-conv channels; expected RGB and 3 * scale**2"
        )
    return Compact(weights, layers=layers, scale=math.isqrt(last // 3))

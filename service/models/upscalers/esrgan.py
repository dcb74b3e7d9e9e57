"""ESRGAN / Real-ESRGAN RRDBNet, from any of its published key layouts.

Layouts (spandrel detects the same ones):
- old (xinntao ESRGAN, most community "4x-*.pth" models): ``model.0`` first conv,
  ``model.1.sub.{i}.RDB{r}.conv{c}.0`` dense blocks, ``model.1.sub.{NB}`` trunk conv, then the upsampling
  convs at ``model.3, 6, ...``, the HR conv and the last conv; the scale is 2**((len(model) - 5) // 3);
- new (basicsr / Real-ESRGAN): ``conv_first``, ``body.{i}.rdb{r}.conv{c}``, ``conv_body``,
  ``conv_up{k}``, ``conv_hr``, ``conv_last``;
- BSRGAN / RealSR: ``RRDB_trunk.{i}.RDB{r}.conv{c}``, ``trunk_conv``, ``upconv{k}``, ``HRconv``.
A first conv taking 4x or 16x the output channels is Real-ESRGAN's pixel-unshuffle variant (x2plus:
the image is unshuffled by 2 first, so the net's 4x is a 2x upscale).

Forward (the published network): feat = first(x); feat += trunk(RRDBs(feat)); per 2x stage: nearest
upsample, conv, LeakyReLU(0.2); last(LeakyReLU(hr(feat))). Each RRDB is three residual dense blocks
(five convs, the first four with LeakyReLU(0.2) on a growing concatenation; out * 0.2 + in), and
out * 0.2 + in again.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor

from .nets import ArchError, Net, StateDict, pad_to_multiple, seq_len, take

OLD_KEYS = ("model.0.weight", "model.1.sub.0.RDB1.conv1.0.weight")
NEW_KEYS = ("conv_first.weight", "body.0.rdb1.conv1.weight", "conv_body.weight", "conv_last.weight")
BSRGAN_KEYS = ("conv_first.weight", "RRDB_trunk.0.RDB1.conv1.weight", "trunk_conv.weight", "conv_last.weight")
PLUS_KEY = "model.1.sub.0.RDB1.conv1x1.weight"  # ESRGAN+ (not supported: refused by name)


def detect(state: StateDict) -> bool:
    return any(all(k in state for k in keys) for keys in (OLD_KEYS, NEW_KEYS, BSRGAN_KEYS)) or (
        "model.0.weight" in state and PLUS_KEY in state
    )


def _lrelu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, 0.2, inplace=True)


class ESRGAN(Net):
    arch = "ESRGAN"
    family = "ESRGAN"
    blocks, ups, unshuffle = 23, 2, 1  # RRDBs, 2x stages, pixel-unshuffle factor of the input

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(pad_to_multiple(x, self.unshuffle), self.unshuffle)
        feat = self.conv(x, "first")
        trunk = feat
        for i in range(self.blocks):
            trunk = self._rrdb(trunk, f"b{i}")
        feat = feat + self.conv(trunk, "trunk")
        for k in range(self.ups):
            feat = _lrelu(self.conv(F.interpolate(feat, scale_factor=2.0, mode="nearest"), f"up{k}"))
        out = self.conv(_lrelu(self.conv(feat, "hr")), "last")
        return out[..., : h * self.scale, : w * self.scale] if self.unshuffle > 1 else out

    def _rrdb(self, x: Tensor, name: str) -> Tensor:
        out = x
        for r in range(3):
            out = self._rdb(out, f"{name}.r{r}")
        return out * 0.2 + x

    def _rdb(self, x: Tensor, name: str) -> Tensor:
        feats = [x]
        for c in range(4):
            feats.append(_lrelu(self.conv(torch.cat(feats, 1), f"{name}.c{c}")))
        return self.conv(torch.cat(feats, 1), f"{name}.c4") * 0.2 + x


def _rename(state: StateDict) -> tuple[dict[str, Tensor], int, int]:
    """Every layout's keys -> our role names; returns (weights, blocks, upsampling stages)."""
    out: dict[str, Tensor] = {}

    def put(role: str, key: str) -> None:
        for kind in ("weight", "bias"):
            out[f"{role}.{kind}"] = take(state, f"{key}.{kind}", 4 if kind == "weight" else 1)

    if "model.0.weight" in state:  # old layout: positions in one nn.Sequential
        if PLUS_KEY in state:
            raise ArchError("ESRGAN+ (conv1x1 in the dense blocks) is not supported")
        blocks = seq_len(state, "model.1.sub") - 1
        length = seq_len(state, "model")
        ups = (length - 5) // 3
        if blocks < 1 or ups < 0 or length != 5 + 3 * ups:
            raise ArchError(f"an ESRGAN state dict with {length} top-level layers and {blocks} blocks")
        put("first", "model.0")
        put("trunk", f"model.1.sub.{blocks}")
        block_key = "model.1.sub.{i}.RDB{r}.conv{c}.0"
        for k in range(ups):
            put(f"up{k}", f"model.{3 * (k + 1)}")
        put("hr", f"model.{3 * ups + 2}")
        put("last", f"model.{3 * ups + 4}")
    else:
        bsrgan = "RRDB_trunk.0.RDB1.conv1.weight" in state
        trunk_name, block_key = (
            ("trunk_conv", "RRDB_trunk.{i}.RDB{r}.conv{c}")
            if bsrgan
            else ("conv_body", "body.{i}.rdb{r}.conv{c}")
        )
        blocks = seq_len(state, "RRDB_trunk" if bsrgan else "body")
        up_keys = sorted(
            (int(m.group(2)), m.group(1))
            for k in state
            if (m := re.fullmatch(r"(upconv|conv_up)(\d+)\.weight", k))
        )
        ups = len(up_keys)
        if [n for n, _ in up_keys] != list(range(1, ups + 1)):
            raise ArchError(f"upsampling convs numbered {[n for n, _ in up_keys]}; expected 1..{ups}")
        put("first", "conv_first")
        put("trunk", trunk_name)
        for k, (n, prefix) in enumerate(up_keys):
            put(f"up{k}", f"{prefix}{n}")
        put("hr", "HRconv" if "HRconv.weight" in state else "conv_hr")
        put("last", "conv_last")
    for i in range(blocks):
        for r in range(3):
            for c in range(5):
                put(f"b{i}.r{r}.c{c}", block_key.format(i=i, r=r + 1, c=c + 1))
    return out, blocks, ups


def load(state: StateDict) -> ESRGAN:
    weights, blocks, ups = _rename(state)
    in_nc, out_nc = weights["first.weight"].shape[1], weights["last.weight"].shape[0]
    unshuffle = 1
    if out_nc and in_nc in (out_nc * 4, out_nc * 16):  # Real-ESRGAN x2plus / x1: pixel-unshuffled input
        unshuffle = math.isqrt(in_nc // out_nc)
    if out_nc != 3 or in_nc != 3 * unshuffle**2:
        raise ArchError(f"{in_nc} input and {out_nc} output channels; upscalers here take RGB (3)")
    if 2**ups < unshuffle:
        raise ArchError(f"an unshuffle factor {unshuffle} with only {ups} 2x stages")
    scale = 2**ups // unshuffle
    return ESRGAN(weights, blocks=blocks, ups=ups, unshuffle=unshuffle, scale=scale, align=unshuffle)

"""Building blocks of the transformer upscalers (DAT, OmniSR, SwinIR-style nets) as plain functions over
a weight dict and a key prefix: the layers of the published code (``nn.Linear``, ``nn.LayerNorm``,
eval-mode ``nn.BatchNorm2d``, depthwise convs) and the window bookkeeping of windowed attention.
``w`` is a :class:`~.nets.Net`'s weight dict; ``prefix`` names the layer as the files do."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LN_EPS = 1e-5  # nn.LayerNorm / nn.BatchNorm2d default


def linear(x: Tensor, w: dict[str, Tensor], prefix: str) -> Tensor:
    return F.linear(x, w[f"{prefix}.weight"], w.get(f"{prefix}.bias"))


def layer_norm(x: Tensor, w: dict[str, Tensor], prefix: str, eps: float = LN_EPS) -> Tensor:
    """nn.LayerNorm over the last dimension."""
    weight = w[f"{prefix}.weight"]
    return F.layer_norm(x, weight.shape, weight, w[f"{prefix}.bias"], eps)


def layer_norm2d(x: Tensor, w: dict[str, Tensor], prefix: str, eps: float) -> Tensor:
    """A LayerNorm over the channels of [B, C, H, W] (biased variance), scaled per channel."""
    mu = x.mean(1, keepdim=True)
    var = (x - mu).pow(2).mean(1, keepdim=True)
    y = (x - mu) / (var + eps).sqrt()
    return w[f"{prefix}.weight"].view(1, -1, 1, 1) * y + w[f"{prefix}.bias"].view(1, -1, 1, 1)


def batch_norm(x: Tensor, w: dict[str, Tensor], prefix: str, eps: float = LN_EPS) -> Tensor:
    """nn.BatchNorm2d in eval mode: the file's running statistics."""
    return F.batch_norm(
        x, w[f"{prefix}.running_mean"], w[f"{prefix}.running_var"], w[f"{prefix}.weight"],
        w[f"{prefix}.bias"], False, 0.0, eps,
    )  # fmt: skip


def conv(
    x: Tensor, w: dict[str, Tensor], prefix: str, groups: int = 1, stride: int = 1, pad: int | None = None
) -> Tensor:
    """A convolution by its weights' key prefix; 'same' zero padding unless ``pad`` is given."""
    weight = w[f"{prefix}.weight"]
    padding = weight.shape[-1] // 2 if pad is None else pad
    return F.conv2d(x, weight, w.get(f"{prefix}.bias"), stride, padding, groups=groups)


def dwconv(x: Tensor, w: dict[str, Tensor], prefix: str) -> Tensor:
    """A depthwise (one filter per channel) convolution with 'same' padding."""
    return conv(x, w, prefix, groups=x.shape[1])


def window_partition(x: Tensor, wh: int, ww: int) -> Tensor:
    """[B, H, W, C] (H, W multiples of the window) -> [B * nW, wh * ww, C], windows in row-major order."""
    b, h, w_, c = x.shape
    x = x.view(b, h // wh, wh, w_ // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, c)


def window_merge(x: Tensor, wh: int, ww: int, h: int, w_: int) -> Tensor:
    """The inverse of :func:`window_partition`: [B * nW, wh * ww, C] -> [B, H, W, C]."""
    b = x.shape[0] // ((h // wh) * (w_ // ww))
    x = x.view(b, h // wh, w_ // ww, wh, ww, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w_, -1)


def relative_index(wh: int, ww: int) -> Tensor:
    """[N, N] (N = wh * ww): for tokens i, j of a window, the row of the (2wh-1) x (2ww-1) table of
    relative offsets (row-major by (dy, dx), each shifted to start at 0) that holds offset i - j."""
    ys, xs = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # [2, N]
    rel = coords[:, :, None] - coords[:, None, :]
    return (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)


def offsets(wh: int, ww: int) -> Tensor:
    """[(2wh-1) * (2ww-1), 2] float: every relative offset (dy, dx) of a window, in
    :func:`relative_index`'s row order."""
    dy, dx = torch.meshgrid(torch.arange(1 - wh, wh), torch.arange(1 - ww, ww), indexing="ij")
    return torch.stack([dy.flatten(), dx.flatten()], 1).float()

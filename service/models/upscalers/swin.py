"""What SwinIR and HAT share (Swin Transformer image restoration, arXiv 2108.10257 / 2205.04437): the
image padded to a multiple of the attention window (reflect, bottom and right, as the published code's
``check_image_size``), normalised as ``(x - mean) * img_range``; ``conv_first``; the tokens
(``patch_embed.norm``, residual groups ``layers.{i}``, ``norm``) and ``conv_after_body``; the
(shifted) window self-attention with a relative position bias table; the pixel-shuffle tail.

Attention masks for shifted windows are -100 (not -inf) between tokens that come from different
image regions, as the published code builds them: a mask of -inf would change the softmax only
where the difference shows, but this one is what the trained weights saw.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .nets import ArchError, Net, StateDict, pad_to_multiple, seq_len, take
from .ops import layer_norm, linear, relative_index, window_merge, window_partition

RGB_MEAN = (0.4488, 0.4371, 0.4040)
# Bounds on what a file may declare, so a hostile one cannot ask for unbounded memory at the probe:
# windows of the published models are 7 (JPEG), 8 (SwinIR) and 16 (HAT); a 64-px window already
# means attention matrices of 4096 x 4096 per window and head. Scales: 1 to 8 published.
MAX_WINDOW = 64
MAX_SCALE = 16
ATTN_SCORES = 1 << 24  # attention scores computed at once (64 MiB in float32): see attend()
MASK_FILL = -100.0
_MASKS_KEPT = 8  # masks by (h, w, device): a batching thread sees few window shapes


def shift_mask(h: int, w: int, ws: int, shift: int) -> Tensor:
    """[nW, ws*ws, ws*ws]: 0 between tokens of one region of the image rolled by ``-shift``, -100
    between tokens that the roll brought together from opposite edges."""
    region = torch.zeros(h, w)
    cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    for i, hs in enumerate(cuts):
        for j, vs in enumerate(cuts):
            region[hs, vs] = 3 * i + j
    wins = window_partition(region[None, :, :, None], ws, ws)[..., 0]  # [nW, N]
    diff = wins[:, None, :] - wins[:, :, None]
    return torch.where(diff != 0, MASK_FILL, 0.0)


def attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T + bias [+ mask]) v per window: q [W, heads, n, d] (already scaled), k and v
    [W, heads, m, d], bias [heads, n, m], mask [nW, n, m] (window i takes mask[i % nW]) -> like q.
    Windows go in chunks of at most ATTN_SCORES scores, so a tile's attention needs about that much
    memory instead of every window's scores at once (a 288-px HAT tile: gigabytes)."""
    wins, heads, n, _ = q.shape
    step = max(1, ATTN_SCORES // (heads * n * k.shape[2]))
    out = torch.empty(wins, heads, n, v.shape[-1], dtype=q.dtype, device=q.device)
    for s in range(0, wins, step):
        e = min(s + step, wins)
        scores = q[s:e] @ k[s:e].transpose(-2, -1) + bias
        if mask is not None:
            scores = scores + mask[torch.arange(s, e, device=mask.device) % mask.shape[0]][:, None]
        out[s:e] = scores.softmax(-1) @ v[s:e]
    return out


def window_attention(
    x: Tensor, w: dict[str, Tensor], prefix: str, heads: int, bias: Tensor, mask: Tensor | None
) -> Tensor:
    """Multi-head self-attention inside each window: x [B*nW, N, C]; ``bias`` [heads, N, N] (the
    relative position bias, gathered at load); ``mask`` [nW, N, N] or None."""
    bn, n, c = x.shape
    qkv = linear(x, w, f"{prefix}.qkv").reshape(bn, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    out = attend(qkv[0] * (c // heads) ** -0.5, qkv[1], qkv[2], bias, mask)
    return linear(out.transpose(1, 2).reshape(bn, n, c), w, f"{prefix}.proj")


def gather_bias(table: Tensor, index: Tensor) -> Tensor:
    """A relative position bias table [rows, heads] at ``index`` [N, M] -> [heads, N, M]."""
    return table[index.reshape(-1)].view(*index.shape, -1).permute(2, 0, 1).contiguous()


def window_of(state: StateDict, key: str) -> int:
    """The window side from a Swin bias table key ((2ws - 1)**2 rows), at most MAX_WINDOW."""
    side = math.isqrt(take(state, key, 2).shape[0])
    if side * side != state[key].shape[0] or side % 2 == 0:
        raise ArchError(f"{key!r} has {state[key].shape[0]} rows; expected (2 * window - 1)**2")
    ws = (side + 1) // 2
    if ws > MAX_WINDOW:
        raise ArchError(f"an attention window of {ws} px; at most {MAX_WINDOW} here")
    return ws


def checked_scale(scale: int) -> int:
    """The net's scale, refused above MAX_SCALE (a file of many upsampling stages would otherwise
    ask for a huge image at the load-time probe)."""
    if not 1 <= scale <= MAX_SCALE:
        raise ArchError(f"a scale of {scale}; at most {MAX_SCALE} here")
    return scale


def keep(state: StateDict, out: dict[str, Tensor], *prefixes: str, optional: bool = False) -> None:
    """Copy every weight/bias under each prefix (exact ``{prefix}.weight``/``.bias`` keys, or anything
    below ``{prefix}.``); a prefix with no key is an :class:`ArchError` unless ``optional``."""
    for prefix in prefixes:
        found = [k for k in state if k.startswith(prefix + ".")]
        if not found and not optional:
            raise ArchError(f"missing weights under {prefix!r}")
        for k in found:
            out[k] = take(state, k)


def rgb_embed(state: StateDict) -> int:
    """The embed dim (``conv_first``'s output channels); the input must be RGB."""
    first = take(state, "conv_first.weight", 4)
    if first.shape[1] != 3:
        raise ArchError(f"conv_first takes {first.shape[1]} channels; upscalers here take RGB")
    return first.shape[0]


def groups(state: StateDict, table: str, embed: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(depths, heads) of the residual groups ``layers.{i}``: blocks per group, and heads from the
    columns of the bias table ``layers.{i}.{table}`` (the group's first attention)."""
    count = seq_len(state, "layers")
    depths = tuple(seq_len(state, f"layers.{i}.residual_group.blocks") for i in range(count))
    heads = tuple(take(state, f"layers.{i}.{table}", 2).shape[1] for i in range(count))
    if not depths or min(depths) < 1 or min(heads) < 1 or any(embed % n for n in heads):
        raise ArchError(f"groups of depths {depths} with heads {heads} over {embed} channels")
    return depths, heads


def pixelshuffle_stages(state: StateDict, prefix: str = "upsample") -> list[int]:
    """The factors of an ``Upsample`` (conv to k*k*nf channels, pixel shuffle by k; repeated) from the
    conv shapes at ``{prefix}.0``, ``{prefix}.2``, ..."""
    factors = []
    for i in range(0, 2 * seq_len(state, prefix), 2):
        key = f"{prefix}.{i}.weight"
        if key not in state:
            break
        out_c, in_c = take(state, key, 4).shape[:2]
        k = math.isqrt(out_c // in_c) if in_c else 0
        if k < 2 or k * k * in_c != out_c:
            raise ArchError(f"{key!r} maps {in_c} to {out_c} channels; expected k*k*{in_c}")
        factors.append(k)
    return factors


class WindowNet(Net):
    """SwinIR / HAT: the parts both networks have; subclasses give ``body`` (residual groups) and
    ``tail`` (upsampling)."""

    window = 8
    unshuffle = 1  # a pixel-unshuffled input (SwinIR's start_unshuffle): the scale is the net's / this
    img_range = 1.0
    depths: tuple[int, ...] = ()
    heads: tuple[int, ...] = ()

    def __init__(self, weights: dict[str, Tensor], **hyper: object) -> None:
        super().__init__(weights)
        for name, value in hyper.items():
            setattr(self, name, value)
        self._masks: dict[tuple[int, int, str], Tensor] = {}

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Net:
        # float16 overflows inside these attention blocks (spandrel marks both "supports_half=False");
        # they run in float32 where the service runs the other models in half precision
        return super().to(device, torch.float32 if dtype == torch.float16 else dtype)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        mean = torch.tensor(RGB_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = (pad_to_multiple(x, self.window * self.unshuffle) - mean) * self.img_range
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        feat = self.conv(x, "conv_first")
        out = self.tail(self.after_body(self.features(feat)) + feat, x)
        return (out / self.img_range + mean)[..., : h * self.scale, : w * self.scale]

    def features(self, feat: Tensor) -> Tensor:
        b, c, h, w = feat.shape
        t = feat.flatten(2).transpose(1, 2)
        if "patch_embed.norm.weight" in self.w:
            t = layer_norm(t, self.w, "patch_embed.norm")
        for i in range(len(self.depths)):
            t = self.group(t, i, h, w)
        return layer_norm(t, self.w, "norm").transpose(1, 2).reshape(b, c, h, w)

    def group(self, t: Tensor, i: int, h: int, w: int) -> Tensor:
        raise NotImplementedError

    def tail(self, body: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError

    def after_body(self, x: Tensor, prefix: str = "conv_after_body") -> Tensor:
        """``1conv`` (one 3x3), ``3conv`` (3x3 to C/4, LeakyReLU 0.2, 1x1, LeakyReLU 0.2, 3x3 back) or,
        when the file has neither, HAT's identity."""
        if f"{prefix}.weight" in self.w:
            return self.conv(x, prefix)
        if f"{prefix}.0.weight" in self.w:
            x = F.leaky_relu(self.conv(x, f"{prefix}.0"), 0.2)
            x = F.leaky_relu(self.conv(x, f"{prefix}.2"), 0.2)
            return self.conv(x, f"{prefix}.4")
        return x

    def shuffle_up(self, x: Tensor, stages: tuple[int, ...]) -> Tensor:
        """``conv_before_upsample`` (LeakyReLU 0.01, nn.LeakyReLU's default), the ``upsample`` stages,
        ``conv_last``: SwinIR's "pixelshuffle" and HAT's only upsampler."""
        x = F.leaky_relu(self.conv(x, "conv_before_upsample.0"), 0.01)
        for i, k in enumerate(stages):
            x = F.pixel_shuffle(self.conv(x, f"upsample.{2 * i}"), k)
        return self.conv(x, "conv_last")

    def mlp(self, t: Tensor, prefix: str) -> Tensor:
        """fc1, GELU (exact, nn.GELU's default), fc2."""
        return linear(F.gelu(linear(t, self.w, f"{prefix}.fc1")), self.w, f"{prefix}.fc2")

    def window_attn(self, y: Tensor, prefix: str, heads: int, shifted: bool) -> Tensor:
        """(Shifted) window attention over y [B, H, W, C] -> [B, H, W, C]; the bias is
        ``{prefix}.bias`` (gathered at load)."""
        b, h, w, c = y.shape
        ws, shift = self.window, self.window // 2
        if shifted:
            y = torch.roll(y, (-shift, -shift), (1, 2))
        mask = self.mask(h, w, y) if shifted else None
        out = window_attention(
            window_partition(y, ws, ws), self.w, prefix, heads, self.w[f"{prefix}.bias"], mask
        )
        out = window_merge(out, ws, ws, h, w)
        return torch.roll(out, (shift, shift), (1, 2)) if shifted else out

    def mask(self, h: int, w: int, like: Tensor) -> Tensor:
        key = (h, w, str(like.device))
        found = self._masks.get(key)
        if found is None or found.dtype != like.dtype:
            if len(self._masks) >= _MASKS_KEPT:
                self._masks.pop(next(iter(self._masks)))
            found = shift_mask(h, w, self.window, self.window // 2).to(like.device, like.dtype)
            self._masks[key] = found
        return found


def swin_bias(state: StateDict, weights: dict[str, Tensor], prefix: str, ws: int) -> None:
    """``{prefix}.relative_position_bias_table`` gathered into ``{prefix}.bias`` [heads, N, N]."""
    table = take(state, f"{prefix}.relative_position_bias_table", 2)
    if table.shape[0] != (2 * ws - 1) ** 2:
        raise ArchError(f"{prefix}.relative_position_bias_table has {table.shape[0]} rows; window {ws}")
    weights[f"{prefix}.bias"] = gather_bias(table, relative_index(ws, ws))

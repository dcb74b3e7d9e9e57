"""k-diffusion style image UNet (inner model for Karras preconditioning) and its loader.

The network is called as ``unet(x * c_in, c_noise, class_cond=..., aug_cond=..., cross_cond=...)``
with ``c_noise = log(sigma) / 4`` (the core's ``KarrasDenoiser`` computes both). Residual blocks
use adaptive group norm driven by one conditioning vector: Fourier features of c_noise (plus
augmentation and class embeddings) through a small mapping MLP.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from service.models.stepcache.state import live, run_cached

AUG_COND_DIM = 9  # length of the Karras augmentation conditioning vector


@dataclass
class UNetConfig:
    """Architecture + noise-range config; saved as config.json next to the weights."""

    in_channels: int = 1
    image_size: int = 16
    widths: list[int] = field(default_factory=lambda: [64, 128, 128])
    depths: list[int] = field(default_factory=lambda: [2, 2, 2])
    self_attn: list[bool] = field(default_factory=lambda: [False, False, True])
    mapping_dim: int = 256
    mapping_depth: int = 2
    num_classes: int = 0  # 0 = unconditional; the null class (for CFG) is index num_classes
    cross_cond_dim: int = 0  # 0 = no cross-attention
    has_aug_cond: bool = False
    head_dim: int = 32
    dropout: float = 0.0
    groups: int = 16
    gradient_checkpointing: bool = False
    sigma_data: float = 0.5
    sigma_min: float = 0.01
    sigma_max: float = 20.0

    def __post_init__(self) -> None:
        n = len(self.widths)
        if n == 0 or len(self.depths) != n or len(self.self_attn) != n:
            raise ValueError("widths, depths and self_attn must be non-empty lists of the same length")
        if any(w % self.groups for w in self.widths):
            raise ValueError(f"every width must be divisible by groups={self.groups}: {self.widths}")
        if self.image_size % (2 ** (n - 1)):
            raise ValueError(f"image_size {self.image_size} must be divisible by 2**{n - 1}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError("need 0 < sigma_min < sigma_max")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown UNet config keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> UNetConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def zero_init(module: nn.Module) -> nn.Module:
    # Output projections start at zero so every residual branch starts as the identity.
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class FourierFeatures(nn.Module):
    weight: Tensor

    def __init__(self, in_features: int, out_features: int, std: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("weight", torch.randn([out_features // 2, in_features]) * std)

    def forward(self, x: Tensor) -> Tensor:
        # In float32 whatever the model dtype: in fp16 the phases (up to ~20 rad) keep only ~1e-2 rad.
        f = 2 * math.pi * x.float() @ self.weight.float().T
        return torch.cat([f.cos(), f.sin()], dim=-1).to(self.weight.dtype)


class AdaGroupNorm(nn.Module):
    def __init__(self, channels: int, cond_dim: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.mapper = zero_init(nn.Linear(cond_dim, 2 * channels))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale, shift = self.mapper(cond)[:, :, None, None].chunk(2, dim=1)
        return F.group_norm(x, self.groups) * (1 + scale) + shift


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, cond_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = AdaGroupNorm(c_in, cond_dim, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = AdaGroupNorm(c_out, cond_dim, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor, cross: Tensor | None = None) -> Tensor:
        h = self.conv1(F.gelu(self.norm1(x, cond)))
        h = self.conv2(self.dropout(F.gelu(self.norm2(h, cond))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    def __init__(self, channels: int, cond_dim: int, groups: int, head_dim: int) -> None:
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm = AdaGroupNorm(channels, cond_dim, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor, cond: Tensor, cross: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x, cond)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each [b, heads, hw, d]
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(y.transpose(-1, -2).reshape(b, c, h, w))


class CrossAttention(nn.Module):
    def __init__(self, channels: int, cond_dim: int, cross_dim: int, groups: int, head_dim: int) -> None:
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm = AdaGroupNorm(channels, cond_dim, groups)
        self.norm_cross = nn.LayerNorm(cross_dim)
        self.q = nn.Conv2d(channels, channels, 1)
        self.kv = nn.Linear(cross_dim, 2 * channels)
        self.out = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor, cond: Tensor, cross: Tensor | None = None) -> Tensor:
        if cross is None:
            raise ValueError("this UNet has cross-attention: pass cross_cond [B, tokens, cross_cond_dim]")
        b, c, h, w = x.shape
        q = self.q(self.norm(x, cond)).reshape(b, self.heads, c // self.heads, h * w).transpose(-1, -2)
        k, v = self.kv(self.norm_cross(cross)).reshape(b, -1, 2, self.heads, c // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2))
        return x + self.out(y.transpose(-1, -2).reshape(b, c, h, w))


class Resample(nn.Module):
    def __init__(self, c_in: int, c_out: int, up: bool) -> None:
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x: Tensor, cond: Tensor, cross: Tensor | None = None) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest") if self.up else F.avg_pool2d(x, 2)
        return self.conv(x)


class UNet(nn.Module):
    """Inner model: ``forward(x, c_noise, class_cond=None, aug_cond=None, cross_cond=None)``."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        d = cfg.mapping_dim
        self.time_emb = FourierFeatures(1, d)
        self.time_in = nn.Linear(d, d)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, d) if cfg.num_classes > 0 else None
        self.aug_emb = FourierFeatures(AUG_COND_DIM, d) if cfg.has_aug_cond else None
        self.aug_in = nn.Linear(d, d, bias=False) if cfg.has_aug_cond else None
        layers: list[nn.Module] = []
        for _ in range(cfg.mapping_depth):
            layers += [nn.Linear(d, d), nn.GELU()]
        self.mapping = nn.Sequential(*layers)
        self.proj_in = nn.Conv2d(cfg.in_channels, cfg.widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.up = nn.ModuleList()
        for i, (w, depth) in enumerate(zip(cfg.widths, cfg.depths, strict=True)):
            level: list[nn.Module] = [Resample(cfg.widths[i - 1], w, up=False)] if i > 0 else []
            for _ in range(depth):
                level += self._blocks(w, w, i)
            self.down.append(nn.ModuleList(level))
        for i in reversed(range(len(cfg.widths))):
            w = cfg.widths[i]
            level = self._blocks(2 * w, w, i)  # first block eats the skip concatenation
            for _ in range(cfg.depths[i] - 1):
                level += self._blocks(w, w, i)
            if i > 0:
                level.append(Resample(w, cfg.widths[i - 1], up=True))
            self.up.append(nn.ModuleList(level))
        self.norm_out = nn.GroupNorm(cfg.groups, cfg.widths[0])
        self.proj_out = zero_init(nn.Conv2d(cfg.widths[0], cfg.in_channels, 3, padding=1))

    def _blocks(self, c_in: int, c_out: int, level: int) -> list[nn.Module]:
        cfg = self.config
        out: list[nn.Module] = [ResBlock(c_in, c_out, cfg.mapping_dim, cfg.groups, cfg.dropout)]
        if cfg.self_attn[level]:
            out.append(SelfAttention(c_out, cfg.mapping_dim, cfg.groups, cfg.head_dim))
            if cfg.cross_cond_dim > 0:
                out.append(
                    CrossAttention(c_out, cfg.mapping_dim, cfg.cross_cond_dim, cfg.groups, cfg.head_dim)
                )
        return out

    def cache_methods(self) -> tuple[str, ...]:
        """DeepCache needs a level below the first to skip."""
        return ("deepcache",) if len(self.down) > 1 else ()

    def _cond(self, c_noise: Tensor, class_cond: Tensor | None, aug_cond: Tensor | None) -> Tensor:
        b = c_noise.shape[0]
        emb = self.time_in(self.time_emb(c_noise.reshape(b, 1)))
        if self.class_emb is not None:
            if class_cond is None:  # no label given means the null (unconditional) class
                class_cond = torch.full([b], self.config.num_classes, dtype=torch.long, device=emb.device)
            emb = emb + self.class_emb(class_cond)
        elif class_cond is not None:
            raise ValueError("class_cond given but this UNet is unconditional (num_classes=0)")
        if self.aug_emb is not None and self.aug_in is not None:
            aug = emb.new_zeros([b, AUG_COND_DIM]) if aug_cond is None else aug_cond
            emb = emb + self.aug_in(self.aug_emb(aug))
        return self.mapping(emb)

    def _run(self, block: nn.Module, x: Tensor, cond: Tensor, cross: Tensor | None) -> Tensor:
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, cond, cross, use_reentrant=False)  # type: ignore[no-any-return]
        return block(x, cond, cross)  # type: ignore[no-any-return]

    def forward(
        self,
        x: Tensor,
        c_noise: Tensor,
        class_cond: Tensor | None = None,
        aug_cond: Tensor | None = None,
        cross_cond: Tensor | None = None,
        cache: Tensor | None = None,
    ) -> Tensor:
        """``cache``: the rows' step cache (models/stepcache: DeepCache over the levels below the first)."""
        # Callers keep the sampler state in float32 (or float64); a half-precision model casts its
        # inputs here and answers in the caller's dtype.
        dtype = self.proj_in.weight.dtype
        cross_cond = None if cross_cond is None else cross_cond.to(dtype)
        cond = self._cond(c_noise, class_cond, aug_cond)
        h = self.proj_in(x.to(dtype))
        if live(cache):
            skip = self._down(h, cond, cross_cond, self.down[:1], [])
            h = run_cached(cache, skip, lambda index: self.deep(skip, cond, cross_cond, index))
            h = self._up(h, cond, cross_cond, self.up[-1:], [skip])
        else:
            skips: list[Tensor] = []
            h = self._down(h, cond, cross_cond, self.down, skips)
            h = self._up(h, cond, cross_cond, self.up, skips)
        return self.proj_out(F.gelu(self.norm_out(h))).to(x.dtype)

    def _down(
        self, h: Tensor, cond: Tensor, cross: Tensor | None, levels: Any, skips: list[Tensor]
    ) -> Tensor:
        for level in levels:
            for block in level:
                h = self._run(block, h, cond, cross)
            skips.append(h)
        return h

    def _up(self, h: Tensor, cond: Tensor, cross: Tensor | None, levels: Any, skips: list[Tensor]) -> Tensor:
        for level in levels:
            h = torch.cat([h, skips.pop()], dim=1)
            for block in level:
                h = self._run(block, h, cond, cross)
        return h

    def deep(self, h: Tensor, cond: Tensor, cross: Tensor | None, index: Tensor | None = None) -> Tensor:
        """Every level below the first, down and up, from the first level's output ``h`` (its rows
        ``index``; None: all): the part DeepCache reuses."""
        if index is not None:
            h, cond = h.index_select(0, index), cond.index_select(0, index)
            cross = None if cross is None else cross.index_select(0, index)
        skips: list[Tensor] = []
        h = self._down(h, cond, cross, self.down[1:], skips)
        return self._up(h, cond, cross, self.up[:-1], skips)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_denoiser(
    folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, UNetConfig]:
    """Load ``config.json`` + ``model.safetensors`` from a model folder as a Karras denoiser.

    The returned denoiser is called as ``denoiser(x, sigma[B], class_cond=...)`` and carries
    float attributes ``sigma_min``/``sigma_max`` for schedule construction and ``num_classes``.
    """
    from safetensors.torch import load_file

    from service.sampling.denoisers import KarrasDenoiser

    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    config = UNetConfig.load(folder / manifest.get("config", "config.json"))
    config.gradient_checkpointing = False  # inference never needs it
    inner = UNet(config)
    inner.load_state_dict(load_file(str(folder / manifest.get("weights", "model.safetensors"))))
    inner.to(device=device, dtype=dtype).eval().requires_grad_(False)
    denoiser = KarrasDenoiser(
        inner, sigma_data=config.sigma_data, sigma_min=config.sigma_min, sigma_max=config.sigma_max
    )
    denoiser.num_classes = config.num_classes  # type: ignore[assignment]  # lets KSampler build the null-class uncond for CFG
    return denoiser, config

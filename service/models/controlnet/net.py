"""The ControlNet network (Zhang et al. 2023): a trainable copy of a UNet's encoder whose outputs,
through zero convolutions, are added to the UNet's skip connections and middle block.

Parameter names are diffusers' ``ControlNetModel`` layout (``conv_in``, ``time_embedding``,
``controlnet_cond_embedding``, ``down_blocks``, ``controlnet_down_blocks``, ``mid_block``,
``controlnet_mid_block``; SDXL adds ``add_time_proj`` / ``add_embedding``), so a diffusers folder's
``diffusion_pytorch_model.safetensors`` loads by name and an original ``control_model.*`` file loads
after ``original_keys.to_diffusers``. The encoder blocks are the same diffusers building blocks the
service's UNet is made of (so a ControlNet trained from that UNet's encoder computes what it did);
the conditioning embedding, the assembly and the forward pass are written here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from service.models.stepcache.sd_unet import down_path


class ControlNetConfigError(ValueError):
    """A ControlNet configuration this implementation does not build (the message names the key)."""


@dataclass
class ControlNetConfig:
    """The subset of diffusers' ControlNetModel config that selects the network (its defaults)."""

    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False
    mid_block_type: str = "UNetMidBlock2DCrossAttn"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ControlNetConfig:
        """A diffusers ``config.json``; keys that change the network and are not built here are refused."""
        for key, unsupported in (
            ("class_embed_type", None),
            ("encoder_hid_dim", None),
            ("encoder_hid_dim_type", None),
            ("num_class_embeds", None),
        ):
            if raw.get(key) != unsupported:
                raise ControlNetConfigError(f"ControlNet config {key}={raw[key]!r} is not supported")
        if raw.get("addition_embed_type") not in (None, "text_time"):
            raise ControlNetConfigError(
                f"ControlNet config addition_embed_type={raw['addition_embed_type']!r} is not supported"
            )
        names = {f.name for f in fields(cls)}
        values: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in names
        }
        cfg = cls(**values)
        if cfg.mid_block_type not in ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D"):
            raise ControlNetConfigError(
                f"ControlNet config mid_block_type={cfg.mid_block_type!r} is not supported"
            )
        return cfg

    def per_block(self, value: Any) -> tuple[Any, ...]:
        return tuple(value) if isinstance(value, (tuple, list)) else (value,) * len(self.down_block_types)

    @property
    def is_sdxl(self) -> bool:
        return self.addition_embed_type == "text_time"


class ConditioningEmbedding(nn.Module):
    """The control image [B, C, H, W] in [0, 1] -> features at latent size (a stride-2 conv per level)."""

    def __init__(self, out_channels: int, in_channels: int, widths: tuple[int, ...]) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            self.blocks.append(nn.Conv2d(a, a, 3, padding=1))
            self.blocks.append(nn.Conv2d(a, b, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, hint: Tensor) -> Tensor:
        h = nn.functional.silu(self.conv_in(hint))
        for conv in self.blocks:
            h = nn.functional.silu(conv(h))
        return self.conv_out(h)  # type: ignore[no-any-return]


@dataclass
class Stage:
    """Where :meth:`ControlNet.finish` continues: skip ``level``'s features, the timestep embedding
    and the context, each [pairs, ...] (``select`` keeps some pairs)."""

    h: Tensor
    emb: Tensor
    context: Tensor
    level: int

    def select(self, pick: Tensor) -> Stage:
        return Stage(self.h[pick], self.emb[pick], self.context[pick], self.level)


class ControlNet(nn.Module):
    """``forward(x, t, context, hint, y=None, time_ids=None)`` -> the residuals: one per UNet skip
    connection (in the order the UNet's down blocks produce them), then the middle block's."""

    def __init__(self, cfg: ControlNetConfig) -> None:
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps
        from diffusers.models.unets.unet_2d_blocks import (
            UNetMidBlock2D,
            UNetMidBlock2DCrossAttn,
            get_down_block,
        )

        super().__init__()
        self.cfg = cfg
        ch = cfg.block_out_channels
        if len(ch) != len(cfg.down_block_types):
            raise ControlNetConfigError("block_out_channels and down_block_types differ in length")
        time_dim = ch[0] * 4
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_proj = Timesteps(ch[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        self.time_embedding = TimestepEmbedding(ch[0], time_dim, act_fn=cfg.act_fn)
        if cfg.is_sdxl:
            if cfg.addition_time_embed_dim is None or cfg.projection_class_embeddings_input_dim is None:
                raise ControlNetConfigError(
                    "text_time ControlNets need addition_time_embed_dim and "
                    "projection_class_embeddings_input_dim"
                )
            self.add_time_proj = Timesteps(cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, time_dim)
        self.controlnet_cond_embedding = ConditioningEmbedding(
            ch[0], cfg.conditioning_channels, tuple(cfg.conditioning_embedding_out_channels)
        )
        # diffusers' config calls the head count attention_head_dim when num_attention_heads is unset
        heads = cfg.per_block(cfg.num_attention_heads or cfg.attention_head_dim)
        depth = cfg.per_block(cfg.transformer_layers_per_block)
        only_cross = cfg.per_block(cfg.only_cross_attention)
        self.down_blocks = nn.ModuleList()
        self.controlnet_down_blocks = nn.ModuleList([nn.Conv2d(ch[0], ch[0], 1)])
        out = ch[0]
        for i, kind in enumerate(cfg.down_block_types):
            inp, out = out, ch[i]
            last = i == len(ch) - 1
            self.down_blocks.append(
                get_down_block(
                    kind,
                    num_layers=cfg.layers_per_block,
                    transformer_layers_per_block=depth[i],
                    in_channels=inp,
                    out_channels=out,
                    temb_channels=time_dim,
                    add_downsample=not last,
                    resnet_eps=cfg.norm_eps,
                    resnet_act_fn=cfg.act_fn,
                    resnet_groups=cfg.norm_num_groups,
                    cross_attention_dim=cfg.cross_attention_dim,
                    num_attention_heads=heads[i],
                    attention_head_dim=heads[i] if heads[i] is not None else out,
                    downsample_padding=cfg.downsample_padding,
                    use_linear_projection=cfg.use_linear_projection,
                    only_cross_attention=only_cross[i],
                    upcast_attention=cfg.upcast_attention,
                    resnet_time_scale_shift=cfg.resnet_time_scale_shift,
                )
            )
            for _ in range(cfg.layers_per_block + (0 if last else 1)):
                self.controlnet_down_blocks.append(nn.Conv2d(out, out, 1))
        common: dict[str, Any] = {
            "in_channels": ch[-1],
            "temb_channels": time_dim,
            "resnet_eps": cfg.norm_eps,
            "resnet_act_fn": cfg.act_fn,
            "output_scale_factor": cfg.mid_block_scale_factor,
            "resnet_time_scale_shift": cfg.resnet_time_scale_shift,
            "resnet_groups": cfg.norm_num_groups,
        }
        self.mid_block: nn.Module
        if cfg.mid_block_type == "UNetMidBlock2DCrossAttn":
            self.mid_block = UNetMidBlock2DCrossAttn(
                transformer_layers_per_block=depth[-1],
                cross_attention_dim=cfg.cross_attention_dim,
                num_attention_heads=heads[-1],
                use_linear_projection=cfg.use_linear_projection,
                upcast_attention=cfg.upcast_attention,
                **common,
            )
        else:
            self.mid_block = UNetMidBlock2D(num_layers=0, add_attention=False, **common)
        self.controlnet_mid_block = nn.Conv2d(ch[-1], ch[-1], 1)

    @property
    def outputs(self) -> int:
        """How many residuals a call returns (SD 1.x: 13, SDXL: 10)."""
        return len(self.controlnet_down_blocks) + 1

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        hint: Tensor,
        y: Tensor | None = None,
        time_ids: Tensor | None = None,
    ) -> list[Tensor]:
        """``x``: the UNet's (scaled) latent input [B, C, h, w]; ``t`` [B] timesteps; ``context``
        [B, L, D]; ``hint`` [B, 3, H, W] in [0, 1] (RGB); SDXL: ``y`` pooled text, ``time_ids``."""
        shallow, stage = self.start(x, t, context, hint, y=y, time_ids=time_ids)
        return shallow + self.finish(stage)

    def start(
        self, x: Tensor, t: Tensor, context: Tensor, hint: Tensor, level: int = 1, **sdxl: Tensor | None
    ) -> tuple[list[Tensor], Stage]:
        """The residuals of the skips 0 .. ``level`` (the first features', then the down path's) and
        the state :meth:`finish` continues from: what a row whose UNet step cache at that level holds
        uses (the deeper residuals reach it only through its cached features; stepcache/sd_unet.py)."""
        if self.cfg.controlnet_conditioning_channel_order == "bgr":
            hint = hint.flip(1)
        dt = self.conv_in.weight.dtype
        emb = self.embed(x, t, **sdxl)
        h0 = self.conv_in(x.to(dt)) + self.controlnet_cond_embedding(hint.to(dt))
        return self.start_from(h0, emb, context, level)

    def start_from(self, h0: Tensor, emb: Tensor, context: Tensor, level: int) -> tuple[list[Tensor], Stage]:
        """:meth:`start` from the first features ``h0`` (latent + control features)."""
        context = context.to(h0.dtype)
        h, made = down_path(self.down_blocks, h0, emb, context, 0, level)
        return self._outputs([h0, *made], 0), Stage(h, emb, context, level)

    def finish(self, stage: Stage) -> list[Tensor]:
        """The other residuals (the deeper skips', then the middle block's) from :meth:`start`'s state."""
        emb, context = stage.emb, stage.context
        last = len(self.controlnet_down_blocks) - 1
        h, made = down_path(self.down_blocks, stage.h, emb, context, stage.level, last)
        if self.cfg.mid_block_type == "UNetMidBlock2DCrossAttn":
            h = self.mid_block(h, emb, encoder_hidden_states=context)
        else:
            h = self.mid_block(h, emb)
        return self._outputs(made, stage.level + 1) + self._pooled([self.controlnet_mid_block(h)])

    def embed(self, x: Tensor, t: Tensor, extra: Tensor | None = None, **sdxl: Tensor | None) -> Tensor:
        """The timestep embedding [B, 4 * C0]; ``sdxl``: ``y`` and ``time_ids`` (``extra``, a union
        ControlNet's control-type embedding, is added before SDXL's, in diffusers' order)."""
        y, time_ids = sdxl.get("y"), sdxl.get("time_ids")
        dt = self.conv_in.weight.dtype
        emb = self.time_embedding(self.time_proj(t.reshape(-1).expand(x.shape[0])).to(dt))
        if extra is not None:
            emb = emb + extra
        if self.cfg.is_sdxl:
            if y is None or time_ids is None:
                raise ValueError("an SDXL ControlNet needs the pooled embedding y and time_ids")
            ids = self.add_time_proj(time_ids.flatten()).reshape(x.shape[0], -1)
            emb = emb + self.add_embedding(torch.cat([y, ids], dim=-1).to(dt))
        return emb  # type: ignore[no-any-return]

    def trunk(self, h: Tensor, emb: Tensor, context: Tensor) -> list[Tensor]:
        """The encoder copy from the first features ``h`` (latent + control features) to the residuals."""
        shallow, stage = self.start_from(h, emb, context, 0)
        return shallow + self.finish(stage)

    def _outputs(self, skips: list[Tensor], first: int) -> list[Tensor]:
        """The zero convolutions of skips ``first..``."""
        convs = self.controlnet_down_blocks[first : first + len(skips)]
        return self._pooled([conv(s) for conv, s in zip(convs, skips, strict=True)])

    def _pooled(self, outs: list[Tensor]) -> list[Tensor]:
        if self.cfg.global_pool_conditions:  # shuffle-style ControlNets: global features only
            return [o.mean(dim=(2, 3), keepdim=True).expand_as(o) for o in outs]
        return outs

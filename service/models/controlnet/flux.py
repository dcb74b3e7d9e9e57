"""The Flux ControlNet network (InstantX / Shakker-Labs / XLabs ControlNets as diffusers loads them).

A few of Flux's own transformer blocks run on the latent tokens plus the control image's tokens; a
zero-initialised linear layer after each block turns its image tokens into a residual that the Flux
transformer adds after its blocks (:func:`per_block` maps them onto the transformer's blocks by
diffusers' interval rule). Parameter names are diffusers' ``FluxControlNetModel`` layout
(``x_embedder``, ``context_embedder``, ``time_text_embed``, ``transformer_blocks``,
``single_transformer_blocks``, ``controlnet_blocks``, ``controlnet_single_blocks``,
``controlnet_x_embedder``; union models ``controlnet_mode_embedder``; XLabs-style models
``input_hint_block``), so a diffusers folder's weights load by name. The blocks and embedders are the
diffusers building blocks our Flux transformer is made of (so a ControlNet trained from its blocks
computes what it did); the assembly and the forward pass are written here.

Control inputs: InstantX-style models take the control image as packed VAE latents (``[B, tokens,
in_channels]``, encoded as diffusers' FluxControlNetPipeline does); XLabs-style ones
(``conditioning_embedding_channels`` set) take the image in [-1, 1] and embed it with their own
convolutions, and their residuals repeat over the transformer's blocks (``repeat``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from .net import ConditioningEmbedding, ControlNetConfigError

# diffusers' FluxControlNetModel config: its keys and defaults (FLUX.1's sizes); ``num_mode``: union
# models' control mode count, ``conditioning_embedding_channels``: XLabs-style image embedding
SIZES = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38}
WIDTHS = {"attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096}
OPTIONAL = ("num_mode", "conditioning_embedding_channels")


class FluxControlNetConfig(SimpleNamespace):
    """A FluxControlNetModel config.json's values (the integer ones checked to be integers)."""

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FluxControlNetConfig:
        ints = {**SIZES, **WIDTHS, "pooled_projection_dim": 768}
        values: dict[str, Any] = {k: raw.get(k, d) for k, d in ints.items()}
        values |= {k: raw.get(k) for k in OPTIONAL}
        for k, v in values.items():
            least = (
                0 if k in ("num_layers", "num_single_layers") else 1
            )  # a ControlNet may have no single blocks
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= least) and (
                v is not None or k in ints
            ):
                raise ControlNetConfigError(
                    f"Flux ControlNet config {k}={v!r}: expected an integer >= {least}"
                )
        values["guidance_embeds"] = bool(raw.get("guidance_embeds", False))
        values["axes_dims_rope"] = tuple(raw.get("axes_dims_rope", (16, 56, 56)))
        if values["in_channels"] % values["patch_size"] ** 2:
            raise ControlNetConfigError(
                "Flux ControlNet config: in_channels is not a multiple of patch_size**2"
            )
        return cls(**values)

    @property
    def inner_dim(self) -> int:
        return int(self.num_attention_heads) * int(self.attention_head_dim)


def read_config(folder: Path) -> dict[str, Any]:
    raw = json.loads((folder / "config.json").read_text())
    if not isinstance(raw, dict):
        raise ControlNetConfigError(f"{folder.name}/config.json is not a JSON object")
    return raw


class FluxControlNet(nn.Module):
    """``forward(x, cond, t, context, pooled, guidance, mode, txt_ids, img_ids)`` -> (the residuals
    after each double block, after each single block), each ``[B, tokens, inner_dim]``."""

    def __init__(self, cfg: FluxControlNetConfig) -> None:
        from diffusers.models.embeddings import (
            CombinedTimestepGuidanceTextProjEmbeddings,
            CombinedTimestepTextProjEmbeddings,
        )
        from diffusers.models.transformers.transformer_flux import (
            FluxPosEmbed,
            FluxSingleTransformerBlock,
            FluxTransformerBlock,
        )

        super().__init__()
        self.cfg = cfg
        dim, heads, head_dim = cfg.inner_dim, int(cfg.num_attention_heads), int(cfg.attention_head_dim)
        self.pos_embed = FluxPosEmbed(theta=10000, axes_dim=list(cfg.axes_dims_rope))
        embed = (
            CombinedTimestepGuidanceTextProjEmbeddings
            if cfg.guidance_embeds
            else CombinedTimestepTextProjEmbeddings
        )
        self.time_text_embed = embed(embedding_dim=dim, pooled_projection_dim=cfg.pooled_projection_dim)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, dim)
        self.x_embedder = nn.Linear(cfg.in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            [FluxTransformerBlock(dim, heads, head_dim) for _ in range(cfg.num_layers)]
        )
        self.single_transformer_blocks = nn.ModuleList(
            [FluxSingleTransformerBlock(dim, heads, head_dim) for _ in range(cfg.num_single_layers)]
        )
        self.controlnet_blocks = nn.ModuleList([nn.Linear(dim, dim) for _ in range(cfg.num_layers)])
        self.controlnet_single_blocks = nn.ModuleList(
            [nn.Linear(dim, dim) for _ in range(cfg.num_single_layers)]
        )
        if cfg.num_mode is not None:
            self.controlnet_mode_embedder = nn.Embedding(int(cfg.num_mode), dim)
        self.input_hint_block: nn.Module | None = None
        if cfg.conditioning_embedding_channels is not None:
            self.input_hint_block = ConditioningEmbedding(
                int(cfg.conditioning_embedding_channels), 3, (16, 16, 16, 16)
            )
        self.controlnet_x_embedder = nn.Linear(cfg.in_channels, dim)

    @property
    def union(self) -> bool:
        return self.cfg.num_mode is not None

    @property
    def repeat(self) -> bool:
        """XLabs-style ControlNets' residuals cycle over the transformer's double blocks (diffusers'
        ``controlnet_blocks_repeat``, which its pipeline sets for models with an input_hint_block)."""
        return self.input_hint_block is not None

    def cond_tokens(self, image: Tensor) -> Tensor:
        """XLabs-style: the control image [B, 3, H, W] in [-1, 1] -> tokens [B, tokens, in_channels]
        (embedded, then cut in patch_size x patch_size patches)."""
        assert self.input_hint_block is not None
        c = self.input_hint_block(image)
        b, ch, h, w = c.shape
        p = int(self.cfg.patch_size)
        c = c.reshape(b, ch, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return c.reshape(b, (h // p) * (w // p), ch * p * p)

    def forward(
        self,
        x: Tensor,
        cond: Tensor,
        t: Tensor,
        context: Tensor,
        pooled: Tensor,
        guidance: Tensor | None,
        mode: Tensor | None,
        txt_ids: Tensor,
        img_ids: Tensor,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """``x`` the packed latents [B, tokens, in_channels]; ``cond`` the control tokens (the same
        shape: packed VAE latents, or XLabs-style :meth:`cond_tokens`); ``t`` [B] the flow time;
        ``guidance`` [B] (models with guidance_embeds); ``mode`` [B] long (union models)."""
        h = self.x_embedder(x) + self.controlnet_x_embedder(cond)
        timestep = t.to(h.dtype) * 1000
        if self.cfg.guidance_embeds:
            if guidance is None:
                raise ValueError("this Flux ControlNet takes a guidance value")
            temb = self.time_text_embed(timestep, guidance.to(h.dtype) * 1000, pooled)
        else:
            temb = self.time_text_embed(timestep, pooled)
        enc = self.context_embedder(context)
        if self.union:
            if mode is None:
                raise ValueError("a union Flux ControlNet needs a control mode")
            # the mode is one more text token in front of the prompt's (with the first text id)
            enc = torch.cat([self.controlnet_mode_embedder(mode.reshape(-1, 1)), enc], dim=1)
            txt_ids = torch.cat([txt_ids[:1], txt_ids], dim=0)
        rotary = self.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        doubles: list[Tensor] = []
        for block in self.transformer_blocks:
            enc, h = block(hidden_states=h, encoder_hidden_states=enc, temb=temb, image_rotary_emb=rotary)
            doubles.append(h)
        singles: list[Tensor] = []
        for block in self.single_transformer_blocks:
            enc, h = block(hidden_states=h, encoder_hidden_states=enc, temb=temb, image_rotary_emb=rotary)
            singles.append(h)
        return (
            [proj(s) for proj, s in zip(self.controlnet_blocks, doubles, strict=True)],
            [proj(s) for proj, s in zip(self.controlnet_single_blocks, singles, strict=True)],
        )


def per_block(samples: list[Tensor], blocks: int, repeat: bool) -> list[Tensor]:
    """A ControlNet's residuals for each of the transformer's ``blocks`` blocks, by diffusers' rule
    (FluxTransformer2DModel): block i takes residual ``i // ceil(blocks / len(samples))``, or with
    ``repeat`` (XLabs) ``i % len(samples)``; none when the ControlNet has none."""
    if not samples:
        return []
    if repeat:
        return [samples[i % len(samples)] for i in range(blocks)]
    interval = math.ceil(blocks / len(samples))
    return [samples[i // interval] for i in range(blocks)]


def load_flux(path: Path, device: torch.device, dtype: torch.dtype, axes: tuple[int, ...]) -> FluxControlNet:
    """A diffusers folder (config.json with ``_class_name: FluxControlNetModel`` and its weights) or
    a single file (flux_single.py; ``axes``: the base transformer's rotary axes), loaded strictly: a
    missing or unexpected tensor is an error naming it."""
    from . import files, flux_single

    if path.is_dir():
        raw, sd = read_config(path), files.read_tensors(files.weights(path))
    else:
        raw, sd = flux_single.read_single(path, axes)
    net = FluxControlNet(FluxControlNetConfig.from_dict(raw))
    missing, unexpected = net.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ControlNetConfigError(
            f"weights do not match the config: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    return net.to(device, dtype).eval()

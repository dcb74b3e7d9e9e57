"""A ControlNet's config read off its tensors' shapes (diffusers' names: an original file is renamed
first, ``original_keys``), for single files with no config beside them: the SDXL ControlNets A1111
users have (lllyasviel's ``diffusers_xl_canny_full`` / ``_mid`` / ``_small.safetensors``, which are
``diffusers/controlnet-canny-sdxl-1.0[-mid|-small]``'s weights), and any diffusers folder's weights
file taken out of its folder. diffusers' ``from_single_file`` tells these apart by their keys
(``add_embedding.linear_1.weight``: SDXL; large / mid / small by the level-1 attention) and reads
their config from the hub; here it is read off the shapes.

What the tensors do not say is taken as the original configs have it (:func:`heads`):
8 heads with convolution projections (SD 1.x), 64 channels a head with linear ones (SD 2.x, SDXL),
and SDXL's 256-wide size / crop embeddings.
"""

from __future__ import annotations

import math
import re
from typing import Any

from torch import Tensor

from .net import ControlNetConfigError

SDXL_TIME_EMBED = 256  # SDXL's addition_time_embed_dim: each of the 6 size / crop ids, 256 wide


def is_diffusers(keys: list[str]) -> bool:
    return "controlnet_cond_embedding.conv_in.weight" in keys


def heads(channels: list[int], linear: bool) -> int | list[int]:
    """The attention head count(s): cldm_v15.yaml's 8 heads, or 64 channels a head (cldm_v21, SDXL)."""
    return [max(1, c // 64) for c in channels] if linear else 8


def _count(sd: dict[str, Tensor], pattern: str) -> int:
    return len({m.group(1) for k in sd if (m := re.match(pattern, k))})


def infer_config(sd: dict[str, Tensor]) -> dict[str, Any]:
    """A diffusers ControlNetModel config for a state dict with diffusers' names."""
    try:
        levels = _count(sd, r"down_blocks\.(\d+)\.")
        channels = [int(sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in range(levels)]
        attn = [f"down_blocks.{i}.attentions.0.proj_in.weight" in sd for i in range(levels)]
        depth = [
            _count(sd, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.")
            for i in range(levels)
        ]
        first = next(i for i, a in enumerate(attn) if a)
        linear = sd[f"down_blocks.{first}.attentions.0.proj_in.weight"].ndim == 2
        k = f"down_blocks.{first}.attentions.0.transformer_blocks.0.attn2.to_k.weight"
        if k not in sd:  # no transformer block at that level (SDXL "mid" / "small"): the middle's
            k = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
        hint = sorted(
            int(m.group(1))
            for key in sd
            if (m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.weight$", key))
        )
        widths = [int(sd["controlnet_cond_embedding.conv_in.weight"].shape[0])]
        widths += [int(sd[f"controlnet_cond_embedding.blocks.{j}.weight"].shape[0]) for j in hint[1::2]]
        cfg: dict[str, Any] = {
            "in_channels": int(sd["conv_in.weight"].shape[1]),
            "conditioning_channels": int(sd["controlnet_cond_embedding.conv_in.weight"].shape[1]),
            "block_out_channels": channels,
            # ldm's normalization() is GroupNorm(32); fewer only for channels that 32 does not divide
            "norm_num_groups": math.gcd(32, *channels),
            "layers_per_block": _count(sd, r"down_blocks\.0\.resnets\.(\d+)\."),
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
            "cross_attention_dim": int(sd[k].shape[1]),
            "use_linear_projection": linear,
            "attention_head_dim": heads(channels, linear),
            "transformer_layers_per_block": [d if a else 1 for d, a in zip(depth, attn, strict=True)],
            "conditioning_embedding_out_channels": widths,
            "mid_block_type": "UNetMidBlock2DCrossAttn"
            if "mid_block.attentions.0.proj_in.weight" in sd
            else "UNetMidBlock2D",
        }
        if "add_embedding.linear_1.weight" in sd:
            cfg |= {
                "addition_embed_type": "text_time",
                "addition_time_embed_dim": SDXL_TIME_EMBED,
                "projection_class_embeddings_input_dim": int(sd["add_embedding.linear_1.weight"].shape[1]),
            }
        return cfg
    except (KeyError, StopIteration, IndexError) as exc:
        raise ControlNetConfigError(f"not a ControlNet layout this service reads: missing {exc}") from exc

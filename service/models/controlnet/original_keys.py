"""The original ControlNet checkpoints (lllyasviel's ``control_v11p_sd15_*.pth`` / ``.safetensors``,
the files A1111 users have): ``control_model.``-prefixed (or bare) LDM names -> diffusers' names;
the config is then read off the tensors as for any diffusers-named file (``diffusers_keys``).

The original network (``cldm.py``): ``time_embed.{0,2}``, ``input_hint_block.{0,2,..}`` (the
conditioning embedding: conv, SiLU, ...), ``input_blocks.k`` (k = 0 the input conv; then per level
``layers_per_block`` x [ResBlock, SpatialTransformer?] and a downsampler ``.0.op``), ``zero_convs.k.0``,
``middle_block.{0,1,2}`` and ``middle_block_out.0``; SDXL adds ``label_emb.0.{0,2}``. What the
tensors do not say is the attention head count: the SD 1.x config (``cldm_v15.yaml``) has 8 heads,
SD 2.x and SDXL (linear projections) 64 channels per head.
"""

from __future__ import annotations

import re

from torch import Tensor

from .net import ControlNetConfigError

PREFIX = "control_model."
RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def is_original(keys: list[str]) -> bool:
    """Whether a state dict's names are the original layout (prefixed or not)."""
    return any(k.startswith(PREFIX + "input_hint_block.") or k.startswith("input_hint_block.") for k in keys)


def strip(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """The ControlNet's own tensors without the prefix (v1.0 files also hold a whole SD model)."""
    if any(k.startswith(PREFIX) for k in sd):
        return {k[len(PREFIX) :]: v for k, v in sd.items() if k.startswith(PREFIX)}
    return dict(sd)


def _resnet(rest: str) -> str:
    for old, new in RESNET.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    raise KeyError(rest)


def _levels(sd: dict[str, Tensor]) -> list[list[int]]:
    """input_blocks indices (k >= 1) of each level's ResBlocks, levels split at the downsamplers."""
    ks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"input_blocks\.(\d+)\.", k))})
    levels: list[list[int]] = [[]]
    for k in ks:
        if k == 0:
            continue
        if f"input_blocks.{k}.0.op.weight" in sd:
            levels.append([])
        else:
            levels[-1].append(k)
    return [lv for lv in levels if lv]


def to_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an original-layout state dict (prefix stripped) to diffusers' ControlNetModel names."""
    levels = _levels(sd)
    where: dict[int, str] = {}
    for i, lv in enumerate(levels):
        for j, k in enumerate(lv):
            where[k] = f"down_blocks.{i}.%s.{j}"
        if i < len(levels) - 1:
            where[lv[-1] + 1] = f"down_blocks.{i}.downsamplers.0"
    hint = sorted(int(k.split(".")[1]) for k in sd if re.match(r"input_hint_block\.\d+\.weight$", k))
    hint_names = {hint[0]: "conv_in", hint[-1]: "conv_out"}
    hint_names |= {i: f"blocks.{n}" for n, i in enumerate(hint[1:-1])}
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        out[_rename(key, where, hint_names)] = value
    return out


def _rename(key: str, where: dict[int, str], hint_names: dict[int, str]) -> str:
    parts = key.split(".")
    head = parts[0]
    if head == "time_embed":
        return f"time_embedding.linear_{1 if parts[1] == '0' else 2}." + ".".join(parts[2:])
    if head == "label_emb":
        return f"add_embedding.linear_{1 if parts[2] == '0' else 2}." + ".".join(parts[3:])
    if head == "input_hint_block":
        return f"controlnet_cond_embedding.{hint_names[int(parts[1])]}." + ".".join(parts[2:])
    if head == "zero_convs":
        return f"controlnet_down_blocks.{parts[1]}." + ".".join(parts[3:])
    if head == "middle_block_out":
        return "controlnet_mid_block." + ".".join(parts[2:])
    if head == "middle_block":
        rest = ".".join(parts[2:])
        if parts[1] == "1":
            return "mid_block.attentions.0." + rest
        return f"mid_block.resnets.{0 if parts[1] == '0' else 1}." + _resnet(rest)
    if head == "input_blocks":
        k, sub, rest = int(parts[1]), parts[2], ".".join(parts[3:])
        if k == 0:
            return "conv_in." + rest
        base = where[k]
        if base.endswith("downsamplers.0"):
            return base + ".conv." + ".".join(parts[4:])  # input_blocks.k.0.op.weight
        if sub == "0":
            return base.replace("%s", "resnets") + "." + _resnet(rest)
        return base.replace("%s", "attentions") + "." + rest
    raise ControlNetConfigError(f"unexpected original ControlNet key {key!r}")

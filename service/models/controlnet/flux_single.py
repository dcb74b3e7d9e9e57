"""Flux ControlNets as one ``.safetensors`` file, as ComfyUI users keep them in ``models/controlnet``:

- diffusers' names without a config (InstantX's / Shakker-Labs' ``diffusion_pytorch_model.safetensors``
  saved under another name): ``controlnet_x_embedder``, ``transformer_blocks.{i}``, ...;
- XLabs' original layout (x-flux's ``ControlNetFlux``, ``flux-canny-controlnet-v3.safetensors``):
  Black Forest Labs' names for the trunk (``img_in``, ``txt_in``, ``time_in``, ``vector_in``,
  ``guidance_in``, ``double_blocks.{i}``: service/models/flux_keys.py maps them), ``controlnet_blocks.{i}``,
  ``pos_embed_input`` (diffusers' ``controlnet_x_embedder``) and the image embedding
  ``input_hint_block.{0,2,...,14}`` (an ``nn.Sequential`` of 8 convolutions: diffusers'
  ``conv_in``, ``blocks.0-5``, ``conv_out``).

The config is read off the tensors' names and shapes; the rotary axes (not in the weights) are the
base transformer's, which a ControlNet trained from it shares.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

HINT_CONVS = ("conv_in", *(f"blocks.{i}" for i in range(6)), "conv_out")  # input_hint_block.0, 2, ... 14


def is_flux(keys: list[str] | set[str]) -> bool:
    """Whether a single file's tensor names are a Flux ControlNet's (either layout)."""
    names = set(keys)
    return "controlnet_x_embedder.weight" in names or "pos_embed_input.weight" in names


def keys_of(path: Path) -> list[str]:
    """A .safetensors file's tensor names (its header only)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except SafetensorError as exc:  # not a safetensors file: the caller's ValueError
        raise ValueError(f"{path.name}: {exc}") from exc


def xlabs_to_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """XLabs' names -> diffusers' FluxControlNetModel names (``sd`` is consumed)."""
    from service.models.flux_keys import flux_to_diffusers

    out: dict[str, Tensor] = {}
    for wb in ("weight", "bias"):
        out[f"controlnet_x_embedder.{wb}"] = sd.pop(f"pos_embed_input.{wb}")
        for i, name in enumerate(HINT_CONVS):
            if f"input_hint_block.{2 * i}.{wb}" in sd:
                out[f"input_hint_block.{name}.{wb}"] = sd.pop(f"input_hint_block.{2 * i}.{wb}")
    for k in [k for k in sd if k.startswith(("controlnet_blocks.", "controlnet_single_blocks."))]:
        out[k] = sd.pop(k)  # the same names in both layouts
    inner = int(sd["img_in.weight"].shape[0])
    out.update(flux_to_diffusers(sd, inner, inner * 4))
    return out


def infer_config(sd: dict[str, Tensor], axes: tuple[int, ...]) -> dict[str, Any]:
    """A FluxControlNetModel config for diffusers-named tensors (``axes``: the rotary axes)."""

    def count(prefix: str) -> int:
        return len({k.split(".")[1] for k in sd if k.startswith(prefix + ".")})

    inner, in_channels = (int(v) for v in sd["x_embedder.weight"].shape)
    doubles, singles = count("transformer_blocks"), count("single_transformer_blocks")
    first = "transformer_blocks.0" if doubles else "single_transformer_blocks.0"
    head = int(sd[f"{first}.attn.norm_q.weight"].shape[0])
    cfg: dict[str, Any] = {
        "_class_name": "FluxControlNetModel",
        "in_channels": in_channels,
        "num_layers": doubles,
        "num_single_layers": singles,
        "attention_head_dim": head,
        "num_attention_heads": inner // head,
        "joint_attention_dim": int(sd["context_embedder.weight"].shape[1]),
        "pooled_projection_dim": int(sd["time_text_embed.text_embedder.linear_1.weight"].shape[1]),
        "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in sd,
        "axes_dims_rope": list(axes),
    }
    if "controlnet_mode_embedder.weight" in sd:
        cfg["num_mode"] = int(sd["controlnet_mode_embedder.weight"].shape[0])
    if "input_hint_block.conv_out.weight" in sd:
        channels = int(sd["input_hint_block.conv_out.weight"].shape[0])
        cfg["conditioning_embedding_channels"] = channels
        cfg["patch_size"] = round((in_channels // channels) ** 0.5)  # tokens of p x p embedded pixels
    return cfg


def read_single(path: Path, axes: tuple[int, ...]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The config and the diffusers-named tensors of a single-file Flux ControlNet."""
    from safetensors.torch import load_file

    sd = load_file(str(path))
    if "pos_embed_input.weight" in sd:
        sd = xlabs_to_diffusers(sd)
    return infer_config(sd, axes), sd

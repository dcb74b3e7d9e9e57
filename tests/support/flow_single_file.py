"""Write a diffusers SD3 MMDiT or Flux transformer in its original single-file layout (SD3 /
SD3.5's ``model.diffusion_model.*``; Flux's ``double_blocks`` / ``single_blocks``) so the loader's
single-file path can be tested.

The inverse of the documented key map: fused qkv per stream, ``joint_blocks.{i}.x_block`` /
``context_block``, adaLN modulations with (shift, scale) in the original order where diffusers
swaps them (the final layer and the last block's context stream).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

PREFIX = "model.diffusion_model."


def _swap(w: Tensor) -> Tensor:
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def sd3_to_original(sd: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    o: dict[str, Tensor] = {"pos_embed": sd.pop("pos_embed.pos_embed")}
    renames = {
        "pos_embed.proj": "x_embedder.proj",
        "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
        "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
        "context_embedder": "context_embedder",
        "proj_out": "final_layer.linear",
    }
    for i in range(num_layers):
        b, j, last = f"transformer_blocks.{i}.", f"joint_blocks.{i}.", i == num_layers - 1
        for wb in ("weight", "bias"):
            o[f"{j}x_block.attn.qkv.{wb}"] = torch.cat([sd.pop(f"{b}attn.to_{c}.{wb}") for c in "qkv"])
            o[f"{j}context_block.attn.qkv.{wb}"] = torch.cat(
                [sd.pop(f"{b}attn.add_{c}_proj.{wb}") for c in "qkv"]
            )
            ctx = sd.pop(f"{b}norm1_context.linear.{wb}")
            o[f"{j}context_block.adaLN_modulation.1.{wb}"] = _swap(ctx) if last else ctx
        renames |= {
            f"{b}attn.to_out.0": f"{j}x_block.attn.proj",
            f"{b}norm1.linear": f"{j}x_block.adaLN_modulation.1",
            f"{b}ff.net.0.proj": f"{j}x_block.mlp.fc1",
            f"{b}ff.net.2": f"{j}x_block.mlp.fc2",
        }
        if not last:
            renames |= {
                f"{b}attn.to_add_out": f"{j}context_block.attn.proj",
                f"{b}ff_context.net.0.proj": f"{j}context_block.mlp.fc1",
                f"{b}ff_context.net.2": f"{j}context_block.mlp.fc2",
            }
    for src, dst in renames.items():
        for wb in ("weight", "bias"):
            o[f"{dst}.{wb}"] = sd.pop(f"{src}.{wb}")
    for wb in ("weight", "bias"):
        o[f"final_layer.adaLN_modulation.1.{wb}"] = _swap(sd.pop(f"norm_out.linear.{wb}"))
    assert not sd, f"unmapped keys: {sorted(sd)}"
    return {PREFIX + k: v.contiguous() for k, v in o.items()}


def write_sd3_single_file(transformer: object, path: Path) -> None:
    sd = {k: v.detach().clone() for k, v in transformer.state_dict().items()}  # type: ignore[attr-defined]
    n = int(transformer.config.num_layers)  # type: ignore[attr-defined]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd3_to_original(sd, n), str(path))


def flux_to_original(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of service.models.flux_keys.flux_to_diffusers (its tables, read backwards)."""
    from service.models.flux_keys import DOUBLE, EMBEDDERS, NORMS

    o: dict[str, Tensor] = {}

    def move(b: str, a: str) -> None:
        for wb in ("weight", "bias"):
            o[f"{a}.{wb}"] = sd.pop(f"{b}.{wb}")

    for a, b in EMBEDDERS.items():
        if f"{b}.linear_1.weight" in sd:
            move(f"{b}.linear_1", f"{a}.in_layer")
            move(f"{b}.linear_2", f"{a}.out_layer")
    move("context_embedder", "txt_in")
    move("x_embedder", "img_in")
    doubles = sorted({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")})
    singles = sorted({int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks.")})
    for i in doubles:
        a, b = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for x, y in DOUBLE.items():
            move(b + y, a + x)
        for x, y in NORMS.items():
            o[f"{a}{x}.scale"] = sd.pop(f"{b}{y}.weight")
        for wb in ("weight", "bias"):
            o[f"{a}img_attn.qkv.{wb}"] = torch.cat([sd.pop(f"{b}attn.to_{c}.{wb}") for c in "qkv"])
            o[f"{a}txt_attn.qkv.{wb}"] = torch.cat([sd.pop(f"{b}attn.add_{c}_proj.{wb}") for c in "qkv"])
    for i in singles:
        a, b = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        move(b + "norm.linear", a + "modulation.lin")
        move(b + "proj_out", a + "linear2")
        o[f"{a}norm.query_norm.scale"] = sd.pop(f"{b}attn.norm_q.weight")
        o[f"{a}norm.key_norm.scale"] = sd.pop(f"{b}attn.norm_k.weight")
        for wb in ("weight", "bias"):
            parts = [sd.pop(f"{b}attn.to_{c}.{wb}") for c in "qkv"] + [sd.pop(f"{b}proj_mlp.{wb}")]
            o[f"{a}linear1.{wb}"] = torch.cat(parts)
    move("proj_out", "final_layer.linear")
    for wb in ("weight", "bias"):
        o[f"final_layer.adaLN_modulation.1.{wb}"] = _swap(sd.pop(f"norm_out.linear.{wb}"))
    assert not sd, f"unmapped keys: {sorted(sd)}"
    return {k: v.contiguous() for k, v in o.items()}


def write_flux_single_file(transformer: object, path: Path) -> None:
    sd = {k: v.detach().clone() for k, v in transformer.state_dict().items()}  # type: ignore[attr-defined]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(flux_to_original(sd), str(path))

"""Flux's original single-file layout (Black Forest Labs' ``flux1-*.safetensors``) -> diffusers keys.

Original: ``img_in`` / ``txt_in`` / ``time_in`` / ``vector_in`` / ``guidance_in`` (MLP embedders,
``in_layer`` / ``out_layer``), ``double_blocks.{i}`` with fused ``img_attn.qkv`` / ``txt_attn.qkv``,
``*_mod.lin``, ``*_mlp.{0,2}``, RMS-norm ``scale`` vectors, ``single_blocks.{i}`` with
``linear1`` = [q; k; v; mlp-in] and ``linear2`` = the output projection, and ``final_layer``
whose adaLN modulation is (shift, scale) where diffusers has (scale, shift). The sizes come from
the model's config, so any width loads (diffusers' own converter assumes FLUX.1's 3072).
"""

from __future__ import annotations

import torch
from torch import Tensor

PREFIX = "model.diffusion_model."
EMBEDDERS = {
    "time_in": "time_text_embed.timestep_embedder",
    "vector_in": "time_text_embed.text_embedder",
    "guidance_in": "time_text_embed.guidance_embedder",
}
DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
}
NORMS = {
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
}


def _swap_halves(w: Tensor) -> Tensor:
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def flux_to_diffusers(sd: dict[str, Tensor], inner_dim: int, mlp_dim: int) -> dict[str, Tensor]:
    """Diffusers ``FluxTransformer2DModel`` keys for an original-layout state dict (consumed)."""
    src = {k.removeprefix(PREFIX): v for k, v in sd.items()}
    out: dict[str, Tensor] = {}

    def move(a: str, b: str) -> None:
        for wb in ("weight", "bias"):
            out[f"{b}.{wb}"] = src.pop(f"{a}.{wb}")

    for a, b in EMBEDDERS.items():
        if f"{a}.in_layer.weight" in src:
            move(f"{a}.in_layer", f"{b}.linear_1")
            move(f"{a}.out_layer", f"{b}.linear_2")
    move("txt_in", "context_embedder")
    move("img_in", "x_embedder")
    doubles = sorted({int(k.split(".")[1]) for k in src if k.startswith("double_blocks.")})
    singles = sorted({int(k.split(".")[1]) for k in src if k.startswith("single_blocks.")})
    for i in doubles:
        a, b = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for x, y in DOUBLE.items():
            move(a + x, b + y)
        for x, y in NORMS.items():
            out[f"{b}{y}.weight"] = src.pop(f"{a}{x}.scale")
        for stream, names in (
            ("img", ("to_q", "to_k", "to_v")),
            ("txt", ("add_q_proj", "add_k_proj", "add_v_proj")),
        ):
            for wb in ("weight", "bias"):
                for name, part in zip(
                    names, src.pop(f"{a}{stream}_attn.qkv.{wb}").chunk(3, dim=0), strict=True
                ):
                    out[f"{b}attn.{name}.{wb}"] = part
    for i in singles:
        a, b = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        move(a + "modulation.lin", b + "norm.linear")
        move(a + "linear2", b + "proj_out")
        out[f"{b}attn.norm_q.weight"] = src.pop(f"{a}norm.query_norm.scale")
        out[f"{b}attn.norm_k.weight"] = src.pop(f"{a}norm.key_norm.scale")
        for wb in ("weight", "bias"):
            parts = src.pop(f"{a}linear1.{wb}").split([inner_dim] * 3 + [mlp_dim], dim=0)
            for name, part in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), parts, strict=True):
                out[f"{b}{name}.{wb}"] = part
    if "final_layer.linear.weight" in src:  # a ControlNet's trunk (XLabs) has no final layer
        move("final_layer.linear", "proj_out")
        for wb in ("weight", "bias"):
            out[f"norm_out.linear.{wb}"] = _swap_halves(src.pop(f"final_layer.adaLN_modulation.1.{wb}"))
    if src:
        raise KeyError(f"keys this map does not know: {sorted(src)[:8]}")
    return out

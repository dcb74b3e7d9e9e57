"""Random Flux LoRA state dicts for any Flux transformer, with the key names the tools write:
kohya sd-scripts (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` + ``.alpha``), BFL names
with dots (ComfyUI-style ``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``), XLabs
(``double_blocks.0.processor.qkv_lora1.down.weight``), diffusers / ai-toolkit PEFT
(``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tests.support.flow_single_file import flux_to_original

XLABS = {"img_attn.qkv": "qkv_lora1", "img_attn.proj": "proj_lora1", "txt_attn.qkv": "qkv_lora2",
         "txt_attn.proj": "proj_lora2"}  # fmt: skip


def bfl_layers(transformer: Any, rank: int, seed: int) -> dict[str, tuple[Tensor, Tensor]]:
    """(down [r, in], up [out, r]) for every linear layer of the transformer in BFL's names."""
    sd = flux_to_original({k: v.detach().clone() for k, v in transformer.state_dict().items()})
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, w in sd.items():
        if key.endswith(".weight") and w.dim() == 2:
            out[key.removesuffix(".weight")] = (
                torch.randn(rank, w.shape[1], generator=g) * 0.2,
                torch.randn(w.shape[0], rank, generator=g) * 0.2,
            )
    return out


def kohya(layers: dict[str, tuple[Tensor, Tensor]], alpha: float, dtype: torch.dtype) -> dict[str, Tensor]:
    """sd-scripts' networks/lora_flux.py keys; the final layer's alpha is its rank (diffusers' converter
    drops that alpha, so a file the oracle reads right has none to drop)."""
    out = {}
    for name, (down, up) in layers.items():
        k = "lora_unet_" + name.replace(".", "_")
        a = float(down.shape[0]) if name.startswith("final_layer") else alpha
        out |= {f"{k}.lora_down.weight": down.to(dtype), f"{k}.lora_up.weight": up.to(dtype)}
        out[f"{k}.alpha"] = torch.tensor(a, dtype=dtype)
    return out


def bfl_dotted(
    layers: dict[str, tuple[Tensor, Tensor]], prefix: str = "diffusion_model."
) -> dict[str, Tensor]:
    out = {}
    for name, (down, up) in layers.items():
        out |= {f"{prefix}{name}.lora_A.weight": down, f"{prefix}{name}.lora_B.weight": up}
    return out


def xlabs(layers: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """x-flux's double-block attention LoRAs (what XLabs ships: no single blocks, no alpha)."""
    out = {}
    for name, (down, up) in layers.items():
        block, _, tail = name.partition(".")
        i, _, rest = tail.partition(".")
        if block == "double_blocks" and rest in XLABS:
            k = f"double_blocks.{i}.processor.{XLABS[rest]}"
            out |= {f"{k}.down.weight": down, f"{k}.up.weight": up}
    return out


def peft(transformer: Any, rank: int, seed: int) -> dict[str, Tensor]:
    """ai-toolkit / diffusers trainers: every attention and MLP linear of the transformer."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in transformer.named_modules():
        if isinstance(m, torch.nn.Linear) and ("attn." in name or "ff" in name or "proj_mlp" in name):
            out[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.2
            out[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.2
    return out

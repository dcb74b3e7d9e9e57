"""Write a diffusers-layout tiny SD model as one original-layout (LDM / SGM) .safetensors checkpoint.

Our own key mapping (the inverse of what diffusers' single-file converters read), plus a config
folder: the diffusers tree with its weights left out.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

Tensor = torch.Tensor


def _resnet(key: str, vae: bool) -> str:
    if vae:
        return key.replace("conv_shortcut", "nin_shortcut")
    for a, b in (
        ("norm1", "in_layers.0"),
        ("conv1", "in_layers.2"),
        ("time_emb_proj", "emb_layers.1"),
        ("norm2", "out_layers.0"),
        ("conv2", "out_layers.3"),
        ("conv_shortcut", "skip_connection"),
    ):
        key = key.replace(a, b)
    return key


def unet_to_ldm(sd: dict[str, Tensor], cfg: dict) -> dict[str, Tensor]:
    per = int(cfg["layers_per_block"])
    top = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    up_attn = {i for i, t in enumerate(cfg["up_block_types"]) if "CrossAttn" in t}
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        parts = key.split(".")
        head = ".".join(parts[:2])
        if parts[0] in top:
            new = top[parts[0]] + "." + ".".join(parts[1:])
        elif head in top:
            new = top[head] + "." + ".".join(parts[2:])
        elif parts[0] == "down_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "downsamplers":
                new = f"input_blocks.{(per + 1) * (i + 1)}.0.op.{rest.removeprefix('conv.')}"
            else:
                slot = 0 if kind == "resnets" else 1
                rest = _resnet(rest, False) if kind == "resnets" else rest
                new = f"input_blocks.{(per + 1) * i + j + 1}.{slot}.{rest}"
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            slot = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}[(kind, j)]
            new = f"middle_block.{slot}.{_resnet(rest, False) if kind == 'resnets' else rest}"
        elif parts[0] == "up_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "upsamplers":
                slot = 2 if i in up_attn else 1
                new = f"output_blocks.{(per + 1) * i + per}.{slot}.{rest}"
            else:
                slot = 0 if kind == "resnets" else 1
                rest = _resnet(rest, False) if kind == "resnets" else rest
                new = f"output_blocks.{(per + 1) * i + j}.{slot}.{rest}"
        else:
            raise KeyError(f"unmapped UNet key {key}")
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(sd: dict[str, Tensor], cfg: dict) -> dict[str, Tensor]:
    n = len(cfg["block_out_channels"])
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        new = key.replace("conv_norm_out", "norm_out")
        parts = new.split(".")
        if len(parts) > 2 and parts[1] == "down_blocks":
            i, kind, rest = parts[2], parts[3], ".".join(parts[5:])
            new = (
                f"{parts[0]}.down.{i}.downsample.{rest}"
                if kind == "downsamplers"
                else f"{parts[0]}.down.{i}.block.{parts[4]}.{_resnet(rest, True)}"
            )
        elif len(parts) > 2 and parts[1] == "up_blocks":
            i, kind, rest = n - 1 - int(parts[2]), parts[3], ".".join(parts[5:])
            new = (
                f"{parts[0]}.up.{i}.upsample.{rest}"
                if kind == "upsamplers"
                else f"{parts[0]}.up.{i}.block.{parts[4]}.{_resnet(rest, True)}"
            )
        elif len(parts) > 2 and parts[1] == "mid_block":
            rest = ".".join(parts[4:])
            if parts[2] == "resnets":
                new = f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{_resnet(rest, True)}"
            else:
                for a, b in attn.items():
                    if rest.startswith(a + "."):
                        rest = b + rest[len(a) :]
                new = f"{parts[0]}.mid.attn_1.{rest}"
                if value.ndim == 2:
                    value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {prefix + "text_model." + k.removeprefix("text_model."): v for k, v in sd.items()}


def openclip_to_ldm(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    top = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    for k, v in sd.items():
        if k in top:
            out[prefix + top[k]] = v
        elif k == "text_projection.weight":
            out[prefix + "text_projection"] = v.T.contiguous()
    layers = sorted({int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers.")})
    for i in layers:
        src, dst = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [sd[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv)
            out[f"{dst}attn.out_proj.{kind}"] = sd[f"{src}self_attn.out_proj.{kind}"]
            out[f"{dst}ln_1.{kind}"] = sd[f"{src}layer_norm1.{kind}"]
            out[f"{dst}ln_2.{kind}"] = sd[f"{src}layer_norm2.{kind}"]
            out[f"{dst}mlp.c_fc.{kind}"] = sd[f"{src}mlp.fc1.{kind}"]
            out[f"{dst}mlp.c_proj.{kind}"] = sd[f"{src}mlp.fc2.{kind}"]
    return out


def write_single_file(diffusers_dir: Path, ckpt: Path, config_dir: Path) -> None:
    """``diffusers_dir`` -> ``ckpt`` (original layout) + ``config_dir`` (the tree without weights)."""

    def load(sub: str) -> tuple[dict[str, Tensor], dict]:
        files = sorted((diffusers_dir / sub).glob("*.safetensors"))
        return load_file(str(files[0])), json.loads((diffusers_dir / sub / "config.json").read_text())

    sdxl = (diffusers_dir / "text_encoder_2").is_dir()
    state: dict[str, Tensor] = {}
    unet, ucfg = load("unet")
    state.update(unet_to_ldm(unet, ucfg))
    vae, vcfg = load("vae")
    state.update(vae_to_ldm(vae, vcfg))
    te, _ = load("text_encoder")
    state.update(
        clip_to_ldm(te, "conditioner.embedders.0.transformer." if sdxl else "cond_stage_model.transformer.")
    )
    if sdxl:
        te2, _ = load("text_encoder_2")
        state.update(openclip_to_ldm(te2, "conditioner.embedders.1.model."))
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(ckpt))
    shutil.copytree(diffusers_dir, config_dir, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))

"""Tiny random ControlNets for the tiny SD models of ``sd_tiny``, saved in the real layouts: a
diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) and an original
single file (``control_model.*`` LDM names, as lllyasviel's ``control_v11p_sd15_*`` files).

The original names are written by :func:`to_original` (diffusers -> LDM); the test suite checks
that diffusers' own converter (``convert_controlnet_checkpoint``) maps them back to the same tensors,
so the file has the real layout. Diffusers zero-initialises the zero convolutions; these get small
random values so every residual matters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.support.sd_tiny import save_diffusers, sdxl_added_conditioning, write_manifest

RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def make_controlnet(sdxl: bool = False, seed: int = 0, heads: int = 4, **over: Any) -> Any:
    """A diffusers ControlNetModel for ``sd_tiny``'s UNet (SD1: context 32; SDXL: 80, text_time)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    extra = sdxl_added_conditioning(48) if sdxl else {}
    kw: dict[str, Any] = {
        "block_out_channels": (16, 32),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "cross_attention_dim": 80 if sdxl else 32,
        "attention_head_dim": heads,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "conditioning_embedding_out_channels": (8, 8, 16, 16),
        **extra,
        **over,
    }
    net = ControlNetModel(**kw).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(
                ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
            ):
                p.copy_(torch.randn_like(p) * 0.2)
    return net


def save_folder(net: Any, folder: Path) -> Path:
    net.save_pretrained(str(folder), safe_serialization=True)
    return folder


def to_original(sd: dict[str, torch.Tensor], layers_per_block: int, levels: int) -> dict[str, torch.Tensor]:
    """diffusers ControlNetModel names -> the original ``control_model.*`` names."""
    out = {}
    hint_blocks = sorted(
        {int(k.split(".")[2]) for k in sd if k.startswith("controlnet_cond_embedding.blocks.")}
    )
    for key, v in sd.items():
        p = key.split(".")
        if p[0] == "time_embedding":
            new = f"time_embed.{0 if p[1] == 'linear_1' else 2}." + ".".join(p[2:])
        elif p[0] == "add_embedding":
            new = f"label_emb.0.{0 if p[1] == 'linear_1' else 2}." + ".".join(p[2:])
        elif p[0] == "controlnet_cond_embedding":
            if p[1] == "conv_in":
                idx, rest = 0, p[2:]
            elif p[1] == "conv_out":
                idx, rest = 2 * (len(hint_blocks) + 1), p[2:]
            else:
                idx, rest = 2 * (int(p[2]) + 1), p[3:]
            new = f"input_hint_block.{idx}." + ".".join(rest)
        elif p[0] == "controlnet_down_blocks":
            new = f"zero_convs.{p[1]}.0." + ".".join(p[2:])
        elif p[0] == "controlnet_mid_block":
            new = "middle_block_out.0." + ".".join(p[1:])
        elif p[0] == "conv_in":
            new = "input_blocks.0.0." + ".".join(p[1:])
        elif p[0] == "mid_block":
            if p[1] == "attentions":
                new = "middle_block.1." + ".".join(p[3:])
            else:
                new = f"middle_block.{0 if p[2] == '0' else 2}.{RESNET[p[3]]}." + ".".join(p[4:])
        elif p[0] == "down_blocks":
            level, kind = int(p[1]), p[2]
            base = 1 + level * (layers_per_block + 1)
            if kind == "downsamplers":
                new = f"input_blocks.{base + layers_per_block}.0.op." + ".".join(p[5:])
            elif kind == "resnets":
                new = f"input_blocks.{base + int(p[3])}.0.{RESNET[p[4]]}." + ".".join(p[5:])
            else:
                new = f"input_blocks.{base + int(p[3])}.1." + ".".join(p[4:])
        else:
            raise KeyError(key)
        out["control_model." + new] = v.clone().contiguous()
    return out


def save_original(net: Any, path: Path) -> Path:
    """The network as an original single file (.safetensors or .pth by the path's suffix)."""
    sd = to_original(net.state_dict(), int(net.config.layers_per_block), len(net.config.block_out_channels))
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, str(path))
    return path


def add_controlnets(store: Path) -> dict[str, Any]:
    """ControlNets in ``store/controlnet/``: ``cn_a``, ``cn_b`` (SD1 diffusers folders),
    ``control_v11p_sd15_tiny`` (SD1 original single file: 8 heads as cldm_v15.yaml;
    GroupNorm(16), as 32 does not divide 16 channels), ``cn_xl``
    (SDXL diffusers folder). Returns the diffusers networks by name (the test oracles)."""
    folder = store / "controlnet"
    nets = {
        "cn_a": make_controlnet(seed=1),
        "cn_b": make_controlnet(seed=2),
        "control_v11p_sd15_tiny": make_controlnet(seed=3, heads=8, norm_num_groups=16),
        "cn_xl": make_controlnet(sdxl=True, seed=4),
    }
    for name, net in nets.items():
        if name.startswith("control_v11p"):
            save_original(net, folder / f"{name}.safetensors")
        else:
            save_folder(net, folder / name)
    return nets


def residual_gap(ours: Any, ref: Any, context: int, pooled: int | None = None) -> float:
    """The largest difference between our ControlNet's residuals and a diffusers ControlNetModel's on
    the same random inputs (latents 8x8, control image 64x64; ``pooled``: SDXL's pooled text width)."""
    g = torch.Generator().manual_seed(0)
    x, hint = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    ctx = torch.randn(2, 7, context, generator=g)
    t = torch.tensor([700.0, 15.0])
    extra: dict[str, Any] = {}
    if pooled is not None:
        extra = {
            "y": torch.randn(2, pooled, generator=g),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
        }
    with torch.no_grad():
        got = ours(x, t, ctx, hint, **extra)
        added = {"text_embeds": extra["y"], "time_ids": extra["time_ids"]} if extra else None
        down, mid = ref(x, t, ctx, hint, added_cond_kwargs=added, return_dict=False)
    want = [*down, mid]
    assert len(got) == len(want), (len(got), len(want))
    return max(float((a - b).abs().max()) for a, b in zip(got, want, strict=True))


def sd_models_with_controlnets(root: Path) -> dict[str, Any]:
    """A store at ``root``: the tiny ``sd1`` and ``sdxl`` models (diffusers folders with manifests)
    and :func:`add_controlnets`' ControlNets, whose diffusers networks it returns."""
    for name, kw in (("sd1", {}), ("sdxl", {"sdxl": True})):
        save_diffusers(root / name, **kw)
        write_manifest(root / name)
    return add_controlnets(root)

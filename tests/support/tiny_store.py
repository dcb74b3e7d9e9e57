"""A tiny model store (random-weight class-conditional UNet, 8x8) for API and e2e tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from service.models.unet import UNet, UNetConfig


def make_tiny_store(
    root: Path,
    name: str = "tiny",
    num_classes: int = 10,
    seed: int = 0,
    image_size: int = 8,
    channels: int = 1,
) -> Path:
    cfg = UNetConfig(
        in_channels=channels,
        image_size=image_size,
        widths=[16, 16],
        depths=[1, 1],
        self_attn=[False, False],
        mapping_dim=32,
        mapping_depth=1,
        num_classes=num_classes,
        groups=8,
        sigma_data=0.5,
        sigma_min=0.02,
        sigma_max=20.0,
    )
    torch.manual_seed(seed)
    unet = UNet(cfg)
    torch.nn.init.normal_(unet.proj_out.weight, std=0.05)  # not the zero init: outputs depend on input
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
    manifest = {
        "name": name,
        "kind": "unet",
        "weights": "model.safetensors",
        "config": "config.json",
        "description": "tiny random-weight test model",
        "defaults": {"sampler": "euler", "schedule": "karras", "steps": 4, "cfg_scale": 1.0},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return root

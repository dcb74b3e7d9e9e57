"""Random LoRA files for tests, in kohya/A1111 and diffusers/PEFT layouts, for any module tree."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

Select = Callable[[str, nn.Module], bool]


def attention_and_convs(name: str, module: nn.Module) -> bool:
    """Attention / feed-forward linears, transformer proj_in/out and resnet convs (UNet); CLIP's
    attention and MLP layers (text encoder)."""
    keys = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net", "q_proj", "k_proj",
            "v_proj", "out_proj", "fc1", "fc2", "conv1", "conv2")  # fmt: skip
    return isinstance(module, nn.Linear | nn.Conv2d) and name.endswith(keys)


def every_layer(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | nn.Conv2d)


def random_layers(
    root: nn.Module, rank: int, seed: int, select: Select = attention_and_convs, std: float = 0.2
) -> dict[str, tuple[Tensor, Tensor]]:
    """(down, up) per selected layer name; conv LoRAs take the layer's kernel for down, 1x1 for up."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in root.named_modules():
        if not select(name, m):
            continue
        if isinstance(m, nn.Linear):
            down = torch.randn(rank, m.in_features, generator=g) * std / m.in_features**0.5
            up = torch.randn(m.out_features, rank, generator=g) * std / rank**0.5
        else:
            assert isinstance(m, nn.Conv2d)
            kh, kw = m.kernel_size
            fan = m.in_channels * kh * kw
            down = torch.randn(rank, m.in_channels, kh, kw, generator=g) * std / fan**0.5
            up = torch.randn(m.out_channels, rank, 1, 1, generator=g) * std / rank**0.5
        out[name] = (down, up)
    return out


def kohya_state(parts: dict[str, dict[str, tuple[Tensor, Tensor]]], alpha: float | None) -> dict[str, Tensor]:
    """kohya / A1111 keys: lora_unet_ / lora_te_ + the module path with underscores."""
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
    out = {}
    for comp, layers in parts.items():
        for name, (down, up) in layers.items():
            key = prefix[comp] + name.replace(".", "_")
            out[f"{key}.lora_down.weight"] = down.contiguous()
            out[f"{key}.lora_up.weight"] = up.contiguous()
            if alpha is not None:
                out[f"{key}.alpha"] = torch.tensor(float(alpha))
    return out


def peft_state(parts: dict[str, dict[str, tuple[Tensor, Tensor]]]) -> dict[str, Tensor]:
    """diffusers / PEFT keys: unet. / text_encoder. + the dotted module path + lora_A / lora_B."""
    out = {}
    for comp, layers in parts.items():
        for name, (down, up) in layers.items():
            out[f"{comp}.{name}.lora_A.weight"] = down.contiguous()
            out[f"{comp}.{name}.lora_B.weight"] = up.contiguous()
    return out


def save(state: dict[str, Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path

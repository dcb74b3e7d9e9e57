"""SD3 LoRAs in the original MMDiT names (kohya sd-scripts' ``lora_unet_joint_blocks_0_x_block_attn_qkv``,
ComfyUI-style dotted ``diffusion_model.joint_blocks...lora_A``). diffusers has no loader for them, so
the oracle merges the LoRA into the original-layout weights (``W += alpha / rank * weight * up @ down``
on the fused qkv, the (shift, scale) modulations as stored) and loads that file with diffusers'
``SD3Transformer2DModel.from_single_file``: our per-row LoRA on the unmerged model must equal it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from service.models.lora import LoraIndex, attach
from service.models.store import ModelStore
from tests.support.flow_single_file import PREFIX, sd3_to_original
from tests.support.flow_tiny import tiny_flow_store

WEIGHT, RANK, ALPHA = 0.8, 4, 2.0


def _two_layer_store(root: Path) -> Any:
    """The tiny SD3 with two joint blocks (the last one's text stream differs: modulation only)."""
    from diffusers import SD3Transformer2DModel

    folder = root / "sd3"
    shutil.copytree(tiny_flow_store() / "sd3", folder)
    cfg = json.loads((folder / "transformer" / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    torch.manual_seed(1)
    tr = SD3Transformer2DModel(**{**cfg, "num_layers": 2})
    with torch.no_grad():
        tr.proj_out.weight.normal_(0, 0.05)  # diffusers starts the output layer at zero
    shutil.rmtree(folder / "transformer")
    tr.save_pretrained(str(folder / "transformer"))
    return tr


def _lora(original: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(2)
    return {
        k.removeprefix(PREFIX).removesuffix(".weight"): (
            torch.randn(RANK, v.shape[1], generator=g) * 0.2,
            torch.randn(v.shape[0], RANK, generator=g) * 0.2,
        )
        for k, v in original.items()
        if k.endswith(".weight") and v.dim() == 2
    }


def _file(layers: dict[str, tuple[Tensor, Tensor]], layout: str) -> dict[str, Tensor]:
    out = {}
    for name, (down, up) in layers.items():
        if layout == "kohya":
            k = "lora_unet_" + name.replace(".", "_")
            out |= {f"{k}.lora_down.weight": down, f"{k}.lora_up.weight": up}
            out[f"{k}.alpha"] = torch.tensor(ALPHA)
        else:  # dotted, no alpha (= rank)
            k = "diffusion_model." + name
            out |= {f"{k}.lora_A.weight": down * (ALPHA / RANK), f"{k}.lora_B.weight": up}
    return out


@pytest.mark.parametrize("layout", ["kohya", "dotted"])
def test_sd3_original_name_lora_equals_merged_weights_through_diffusers(tmp_path: Path, layout: str) -> None:
    from diffusers import SD3Transformer2DModel

    from service.models.flow_loader import _single_file

    tr = _two_layer_store(tmp_path)
    original = sd3_to_original({k: v.detach().clone() for k, v in tr.state_dict().items()}, 2)
    layers = _lora(original)
    merged = dict(original)
    for name, (down, up) in layers.items():
        key = f"{PREFIX}{name}.weight"
        merged[key] = original[key] + WEIGHT * ALPHA / RANK * up @ down
    save_file({k: v.contiguous() for k, v in merged.items()}, str(tmp_path / "merged.safetensors"))
    want_tr = _single_file(SD3Transformer2DModel, tmp_path / "merged.safetensors", tmp_path / "sd3").eval()
    (tmp_path / "loras").mkdir()
    save_file(_file(layers, layout), str(tmp_path / "loras" / "l.safetensors"))
    model = ModelStore(tmp_path).load("sd3")
    adapters = attach(model, LoraIndex(tmp_path))
    assert adapters is not None
    ours_tr = model.text_model.transformer  # type: ignore[attr-defined]
    g = torch.Generator().manual_seed(0)
    cfg = tr.config
    kw = {
        "hidden_states": torch.randn(2, int(cfg.in_channels), 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(2, 8, int(cfg.joint_attention_dim), generator=g),
        "pooled_projections": torch.randn(2, int(cfg.pooled_projection_dim), generator=g),
        "timestep": torch.tensor([700.0, 300.0]),
    }
    try:
        rows = adapters.encode(adapters.resolve([("l", WEIGHT)]), 2)
        with torch.inference_mode():
            with adapters.call(rows):
                ours = ours_tr(**kw).sample
            base = ours_tr(**kw).sample
            want = want_tr(**kw).sample
        assert (want - base).abs().max() > 1e-2, "the LoRA must change the output"
        assert (ours - want).abs().max() <= 1e-4
    finally:
        adapters.close()

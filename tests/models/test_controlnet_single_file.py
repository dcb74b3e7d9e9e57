"""Single-file ControlNets for SD 2.x and SDXL, the layouts A1111 users have, loaded by our code and
compared with diffusers' ``ControlNetModel.from_single_file`` on the same file (given the network's
diffusers config, as its hub lookup would): residuals within 1e-5.

- SD 2.x: thibaud's ``control_v11p_sd21_*`` files, original (LDM) names without the
  ``control_model.`` prefix, linear attention projections, 64 channels a head (cldm_v21.yaml);
- SDXL: lllyasviel's ``diffusers_xl_canny_full`` / ``_mid`` / ``_small.safetensors`` (the weights of
  ``diffusers/controlnet-canny-sdxl-1.0[-mid|-small]``): diffusers' names, no config; "mid" has a
  level whose attention has no transformer block, "small" none at level 1 (diffusers' own tests of
  which is which: ``controlnet_xl_large`` / ``_mid`` keys).

Tiny random networks with the real proportions (64 channels a head, SDXL's 256-wide time ids)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")

from diffusers import ControlNetModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from service.models.controlnet import files  # noqa: E402
from tests.support.controlnet_tiny import make_controlnet, residual_gap, to_original  # noqa: E402

POOLED = 48
SD2 = {
    "block_out_channels": (64, 128),
    "attention_head_dim": (1, 2),  # 64 channels a head
    "use_linear_projection": True,
    "norm_num_groups": 32,
    "cross_attention_dim": 64,
}
SDXL = {
    **SD2,
    "cross_attention_dim": 80,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": POOLED + 6 * 256,
}
CASES: dict[str, dict[str, Any]] = {
    "control_v11p_sd21_tiny": SD2,
    "diffusers_xl_canny_full": {**SDXL, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D")},
    "diffusers_xl_canny_mid": {
        **SDXL,
        "block_out_channels": (32, 64, 128),
        "attention_head_dim": (1, 1, 2),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "transformer_layers_per_block": (1, 0, 1),
    },
    "diffusers_xl_canny_small": {
        **SDXL,
        "block_out_channels": (32, 64, 128),
        "attention_head_dim": (1, 1, 2),
        "down_block_types": ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    },
}


def _save(name: str, folder: Path) -> tuple[Path, Path, Any]:
    """The network as its single file (and its diffusers config folder for diffusers' loader)."""
    sdxl = "xl" in name
    net = make_controlnet(sdxl=sdxl, **CASES[name])
    config = folder / f"{name}-config"
    net.save_config(str(config))
    sd = net.state_dict()
    if not sdxl:  # original names, bare (as thibaud's SD 2.1 files)
        levels = len(net.config.block_out_channels)
        prefixed = to_original(sd, int(net.config.layers_per_block), levels)
        sd = {k.removeprefix("control_model."): v for k, v in prefixed.items()}
    path = folder / "controlnet" / f"{name}.safetensors"
    path.parent.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path, config, net


@pytest.mark.parametrize("name", list(CASES))
def test_single_file_matches_diffusers_from_single_file(tmp_path: Path, name: str) -> None:
    path, config, net = _save(name, tmp_path)
    ref = ControlNetModel.from_single_file(str(path), config=str(config)).eval()
    found = files.scan(tmp_path)
    assert list(found) == [name]  # listed by its stem
    ours = files.load(found[name], torch.device("cpu"), torch.float32)
    sdxl = "xl" in name
    assert ours.cfg.is_sdxl == sdxl and ours.cfg.use_linear_projection
    assert tuple(ours.cfg.block_out_channels) == tuple(net.config.block_out_channels)
    gap = residual_gap(ours, ref, int(net.config.cross_attention_dim), POOLED if sdxl else None)
    assert gap <= 1e-5, gap
    want = net.state_dict()  # diffusers read the file's weights (not a fresh init): the test can fail
    assert all(torch.equal(v, want[k]) for k, v in ref.state_dict().items())

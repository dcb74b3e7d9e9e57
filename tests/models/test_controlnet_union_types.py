"""``files.union_types`` (``/controlnet/model_list``'s ``union_types``, the playground's control-type
choice): the types a union ControlNet serves, read off the weights' header as the files are saved by
diffusers (``save_pretrained``) and kept by ComfyUI / A1111 users (xinsir's ProMax weights file alone,
renamed); every other ControlNet, and a file whose header cannot be read without loading it, has none."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from service.models.controlnet.files import ControlNetFile, union_types
from service.models.controlnet.flux_units import UNION_MODES
from service.models.controlnet.union import TYPES
from tests.support.controlnet_tiny import make_controlnet, save_folder
from tests.support.union_tiny import make_union


def test_sdxl_unions_folder_and_single_file(tmp_path: Path) -> None:
    union, promax = make_union(seed=1, types=6), make_union(seed=2, types=8)
    folder = save_folder(union, tmp_path / "controlnet-union-sdxl-1.0")
    assert union_types(ControlNetFile("a", folder)) == TYPES[:6]  # no tile / repaint
    single = tmp_path / "diffusion_pytorch_model_promax.safetensors"
    save_file({k: v.contiguous() for k, v in promax.state_dict().items()}, str(single))
    assert union_types(ControlNetFile("b", single)) == TYPES
    pth = tmp_path / "promax.pth"
    torch.save(promax.state_dict(), pth)
    assert union_types(ControlNetFile("c", pth)) == ()  # names unreadable without loading: not offered


def test_plain_and_flux_controlnets(tmp_path: Path) -> None:
    from tests.support.flux_controlnet_tiny import make_flux_controlnet

    plain = save_folder(make_controlnet(seed=3), tmp_path / "cn")
    assert union_types(ControlNetFile("cn", plain)) == ()
    flux = save_folder(make_flux_controlnet("fcn_union"), tmp_path / "fcn_union")  # num_mode 10
    assert union_types(ControlNetFile("fcn_union", flux)) == UNION_MODES
    flux_plain = save_folder(make_flux_controlnet("fcn_b"), tmp_path / "fcn_b")
    assert union_types(ControlNetFile("fcn_b", flux_plain)) == ()

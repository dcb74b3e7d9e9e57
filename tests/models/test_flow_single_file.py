"""SD3 / Flux from one original-layout transformer .safetensors + a diffusers-layout config folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from service.models.sd_loader import SDLoadError
from service.models.store import ModelStore
from service.models.text_generate import generate
from tests.support.flow_single_file import write_flux_single_file, write_sd3_single_file
from tests.support.flow_tiny import tiny_flow_store, write_manifest


def _single_file_model(
    root: Path, name: str = "sd3file", weights: str = "sd3.safetensors", src_name: str = "sd3"
) -> Path:
    src = tiny_flow_store() / src_name
    kind = "flux" if src_name.startswith("flux") else "sd3"
    folder = root / name
    shutil.copytree(src, folder / "config")
    for f in (folder / "config" / "transformer").glob("*.safetensors"):
        f.unlink()  # the config folder holds only transformer/config.json
    write_manifest(folder, kind, cfg_scale=1.0 if kind == "flux" else 4.0)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "weights": weights, "config": "config"}))
    return folder


def test_single_file_sd3_equals_the_diffusers_layout(tmp_path: Path) -> None:
    from diffusers import SD3Transformer2DModel

    folder = _single_file_model(tmp_path)
    tr = SD3Transformer2DModel.from_pretrained(str(tiny_flow_store() / "sd3" / "transformer"))
    write_sd3_single_file(tr, folder / "sd3.safetensors")
    assert all(k.startswith("model.diffusion_model.") for k in _keys(folder / "sd3.safetensors"))
    one = ModelStore(tmp_path).load("sd3file")
    shutil.copytree(tiny_flow_store() / "sd3", tmp_path / "sd3")
    two = ModelStore(tmp_path).load("sd3")
    assert one.info["source"] == "single_file" and two.info["source"] == "diffusers"
    kw = {"seeds": [3], "steps": 3, "cfg_scale": 4.0, "output": "latents"}
    a = generate(one.text_model, "the red cat", **kw)  # type: ignore[attr-defined]
    b = generate(two.text_model, "the red cat", **kw)  # type: ignore[attr-defined]
    assert torch.equal(a, b)


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def test_single_file_must_be_safetensors(tmp_path: Path) -> None:
    folder = _single_file_model(tmp_path, weights="sd3.ckpt")
    (folder / "sd3.ckpt").write_bytes(b"not loaded")
    with pytest.raises(SDLoadError, match="safetensors"):
        ModelStore(tmp_path).load("sd3file")


def test_flux_single_file_equals_the_diffusers_layout(tmp_path: Path) -> None:
    from diffusers import FluxTransformer2DModel

    folder = _single_file_model(tmp_path, "fluxfile", "flux1-dev.safetensors", "flux_dev")
    tr = FluxTransformer2DModel.from_pretrained(str(tiny_flow_store() / "flux_dev" / "transformer"))
    write_flux_single_file(tr, folder / "flux1-dev.safetensors")
    one = ModelStore(tmp_path).load("fluxfile")
    shutil.copytree(tiny_flow_store() / "flux_dev", tmp_path / "flux_dev")
    two = ModelStore(tmp_path).load("flux_dev")
    kw = {"seeds": [3], "steps": 3, "guidance": 2.0, "output": "latents"}
    a = generate(one.text_model, "the red cat", **kw)  # type: ignore[attr-defined]
    b = generate(two.text_model, "the red cat", **kw)  # type: ignore[attr-defined]
    assert one.info["source"] == "single_file" and (a - b).abs().max() < 1e-5


def test_flux_key_map_agrees_with_diffusers_converter() -> None:
    """On FLUX.1's sizes (3072 wide, MLP 12288; the converter assumes them), with 1-column
    tensors: our map gives the same keys and the same splits as diffusers' converter."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from service.models.flux_keys import DOUBLE, EMBEDDERS, NORMS, flux_to_diffusers

    g = torch.Generator().manual_seed(0)

    def r(n: int) -> torch.Tensor:
        return torch.randn(n, 1, generator=g)

    sd: dict[str, torch.Tensor] = {}
    for a in EMBEDDERS:
        for layer in ("in_layer", "out_layer"):
            sd |= {f"{a}.{layer}.weight": r(3), f"{a}.{layer}.bias": r(3)}
    for a in ("txt_in", "img_in", "final_layer.linear"):
        sd |= {f"{a}.weight": r(3), f"{a}.bias": r(3)}
    sd |= {"final_layer.adaLN_modulation.1.weight": r(6), "final_layer.adaLN_modulation.1.bias": r(6)}
    for x in DOUBLE:
        sd |= {f"double_blocks.0.{x}.weight": r(4), f"double_blocks.0.{x}.bias": r(4)}
    for x in NORMS:
        sd[f"double_blocks.0.{x}.scale"] = r(2)
    for s in ("img", "txt"):
        sd |= {f"double_blocks.0.{s}_attn.qkv.weight": r(9), f"double_blocks.0.{s}_attn.qkv.bias": r(9)}
    width = 3 * 3072 + 12288
    sd |= {"single_blocks.0.linear1.weight": r(width), "single_blocks.0.linear1.bias": r(width)}
    for x in ("linear2", "modulation.lin"):
        sd |= {f"single_blocks.0.{x}.weight": r(5), f"single_blocks.0.{x}.bias": r(5)}
    sd |= {"single_blocks.0.norm.query_norm.scale": r(2), "single_blocks.0.norm.key_norm.scale": r(2)}
    ours = flux_to_diffusers({"model.diffusion_model." + k: v for k, v in sd.items()}, 3072, 12288)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(sd))
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)

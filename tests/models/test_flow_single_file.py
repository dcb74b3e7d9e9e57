"""SD3 from one original-layout transformer .safetensors + a diffusers-layout config folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from service.models.flow_generate import generate
from service.models.sd_loader import SDLoadError
from service.models.store import ModelStore
from tests.models.flow_single_file import write_sd3_single_file
from tests.models.flow_tiny import tiny_flow_store, write_manifest


def _single_file_model(root: Path, name: str = "sd3file", weights: str = "sd3.safetensors") -> Path:
    src = tiny_flow_store() / "sd3"
    folder = root / name
    shutil.copytree(src, folder / "config")
    for f in (folder / "config" / "transformer").glob("*.safetensors"):
        f.unlink()  # the config folder holds only transformer/config.json
    write_manifest(folder, "sd3", cfg_scale=4.0)
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
    a = generate(one.sd, "the red cat", **kw)  # type: ignore[attr-defined]
    b = generate(two.sd, "the red cat", **kw)  # type: ignore[attr-defined]
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

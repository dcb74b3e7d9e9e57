"""The model store: manifests, names resolved only inside the store, kind -> loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from service.models.store import LOADERS, ManifestError, ModelStore, UnknownModelError, register_loader
from tests.support.tiny_store import make_tiny_store


def test_loads_unet_models_with_shape_and_conditioning(tmp_path: Path) -> None:
    store = ModelStore(make_tiny_store(tmp_path))
    assert sorted(store.scan()) == ["tiny"]
    model = store.load("tiny")
    assert model.latent_shape == (1, 8, 8) and model.conditioning == "class" and model.num_classes == 10
    x = torch.randn(2, 1, 8, 8)
    with torch.inference_mode():
        out = model.denoiser(x, torch.full([2], 1.0), class_cond=torch.tensor([1, 10]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    cond, uncond = model.class_conditioning(torch.tensor([4]))
    assert cond["class_cond"].tolist() == [4] and uncond["class_cond"].tolist() == [10]


@pytest.mark.parametrize("name", ["../tiny", "/etc/passwd", "tiny/../tiny", "nope", ""])
def test_names_resolve_only_inside_the_store(tmp_path: Path, name: str) -> None:
    store = ModelStore(make_tiny_store(tmp_path / "store"))
    with pytest.raises(UnknownModelError, match="valid models: tiny"):
        store.resolve(name)


def test_manifest_files_must_stay_in_the_model_folder(tmp_path: Path) -> None:
    root = make_tiny_store(tmp_path)
    manifest = json.loads((root / "tiny" / "manifest.json").read_text())
    (root / "tiny" / "manifest.json").write_text(
        json.dumps({**manifest, "weights": "../../secret.safetensors"})
    )
    with pytest.raises(ManifestError, match="outside the model folder"):
        ModelStore(root).load("tiny")


def test_unknown_kind_and_mismatched_name_are_errors(tmp_path: Path) -> None:
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "manifest.json").write_text(json.dumps({"name": "odd", "kind": "teleporter"}))
    with pytest.raises(ManifestError, match="unknown kind 'teleporter'; known kinds: .*unet"):
        ModelStore(tmp_path).load("odd")
    (tmp_path / "odd" / "manifest.json").write_text(json.dumps({"name": "even", "kind": "unet"}))
    with pytest.raises(ManifestError, match="differs from its folder"):
        ModelStore(tmp_path).scan()


def test_other_kinds_register_their_loader(tmp_path: Path) -> None:
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "manifest.json").write_text(
        json.dumps({"kind": "test_fake", "defaults": {"steps": 3}})
    )
    seen = []

    def loader(manifest, device, dtype):  # type: ignore[no-untyped-def]
        seen.append((manifest.name, manifest.defaults, device))
        return "loaded"

    register_loader("test_fake", loader)
    try:
        assert ModelStore(tmp_path).load("fake") == "loaded"
    finally:
        LOADERS.pop("test_fake")
    assert seen == [("fake", {"steps": 3}, torch.device("cpu"))]


def test_defaults_are_parsed_once_with_the_manifest(tmp_path: Path) -> None:
    """A manifest's defaults are typed when the store is scanned (ModelDefaults: the one place a
    request's missing fields fall back); a value of the wrong type is that manifest's error."""
    for name, defaults in (
        ("good", {"steps": "12", "cfg_scale": 3, "width": 64}),
        ("bad", {"steps": "many"}),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps({"kind": "unet", "defaults": defaults}))
    errors: dict[str, str] = {}
    manifests = ModelStore(tmp_path).scan(errors)
    d = manifests["good"].model_defaults
    assert (d.steps, d.cfg_scale, d.width, d.height, d.sampler) == (12, 3.0, 64, None, "dpmpp_2m")
    assert "bad" not in manifests and "defaults" in errors["bad"] and "manifest.json" in errors["bad"]

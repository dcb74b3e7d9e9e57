"""Stable Diffusion loading through the real loader and model store: layouts, families, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")

from service.models.sd_loader import SDLoadError  # noqa: E402
from service.models.stable_diffusion import TextLoadedModel  # noqa: E402
from service.models.store import ModelStore, UnknownModelError  # noqa: E402
from tests.support.sd_tiny import tiny_sd_store, write_manifest  # noqa: E402


@pytest.fixture(scope="module")
def store() -> ModelStore:
    return ModelStore(tiny_sd_store())


def _copy(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / "store" / name
    shutil.copytree(tiny_sd_store() / name, dst)
    return dst


@pytest.mark.parametrize(
    "name, family, prediction, source, channels",
    [
        ("sd1", "sd", "epsilon", "diffusers", 4),
        ("sd1v", "sd", "v_prediction", "diffusers", 4),
        ("sd1file", "sd", "epsilon", "single_file", 4),
        ("sd1inpaint", "sd", "epsilon", "diffusers", 9),
        ("sdxl", "sdxl", "epsilon", "diffusers", 4),
        ("sdxlfile", "sdxl", "epsilon", "single_file", 4),
    ],
)
def test_loads_every_family_and_layout(
    store: ModelStore, name: str, family: str, prediction: str, source: str, channels: int
) -> None:
    m = store.load(name)
    assert isinstance(m, TextLoadedModel) and m.text_model is not None
    assert m.conditioning == "text" and m.image_size == (64, 64) and m.latent_shape == (4, 8, 8)
    assert (
        m.info["family"] == family and m.info["prediction_type"] == prediction and m.info["source"] == source
    )
    assert int(m.text_model.unet.config.in_channels) == channels and m.text_model.inpainting == (
        channels == 9
    )
    # the denoiser carries the model's own discrete table (SD scaled_linear betas, T = 1000)
    assert m.denoiser.sigmas.shape == (1000,)
    assert m.denoiser.sigma_min == pytest.approx(0.0292, abs=1e-4)
    assert m.denoiser.sigma_max == pytest.approx(14.6146, abs=1e-3)


def test_single_file_equals_diffusers_layout(store: ModelStore) -> None:
    for a, b in (("sd1", "sd1file"), ("sdxl", "sdxlfile")):
        ma, mb = store.load(a), store.load(b)
        assert ma.text_model is not None and mb.text_model is not None
        inputs_a = ma.text_model.job_inputs("a red cat", "the dog", n=1, cfg_scale=3.0)
        inputs_b = mb.text_model.job_inputs("a red cat", "the dog", n=1, cfg_scale=3.0)
        for key in inputs_a.cond:
            torch.testing.assert_close(inputs_a.cond[key], inputs_b.cond[key])
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            da = ma.denoiser(x, torch.tensor([2.0]), **inputs_a.cond)
            db = mb.denoiser(x, torch.tensor([2.0]), **inputs_b.cond)
        torch.testing.assert_close(da, db)
        torch.testing.assert_close(ma.text_model.decode(x), mb.text_model.decode(x))


def test_names_resolve_inside_the_store(store: ModelStore) -> None:
    for bad in ("../sd1", "/tmp", "sd1/unet", "nope"):
        with pytest.raises(UnknownModelError):
            store.load(bad)


def test_manifest_paths_may_not_leave_the_model_folder(tmp_path: Path) -> None:
    folder = _copy("sd1file", tmp_path)
    write_manifest(folder, weights="../../../etc/passwd", config="config")
    with pytest.raises(ValueError, match="outside the model folder"):
        ModelStore(tmp_path / "store").load("sd1file")


@pytest.mark.parametrize(
    "remove, named",
    [
        ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors"),
        ("vae/config.json", "vae/config.json"),
        ("tokenizer", "tokenizer/vocab.json"),
        ("model_index.json", "model_index.json"),
        ("scheduler/scheduler_config.json", "scheduler/scheduler_config.json"),
    ],
)
def test_missing_files_are_named(tmp_path: Path, remove: str, named: str) -> None:
    folder = _copy("sd1", tmp_path)
    path = folder / remove
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(SDLoadError, match=named.replace(".", r"\.")):
        ModelStore(tmp_path / "store").load("sd1")


def test_single_file_errors_name_the_file(tmp_path: Path) -> None:
    folder = _copy("sd1file", tmp_path)
    store = ModelStore(tmp_path / "store")
    shutil.rmtree(folder / "config")
    with pytest.raises(SDLoadError, match="config folder"):
        store.load("sd1file")
    shutil.copytree(tiny_sd_store() / "sd1file" / "config", folder / "config")
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SDLoadError, match=r"model\.safetensors"):
        store.load("sd1file")


def test_mismatched_components_are_named(tmp_path: Path) -> None:
    folder = _copy("sd1", tmp_path)
    cfg = json.loads((folder / "text_encoder" / "config.json").read_text())
    cfg.update(hidden_size=48, intermediate_size=96)
    (folder / "text_encoder" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SDLoadError, match="text_encoder"):
        ModelStore(tmp_path / "store").load("sd1")


def test_mismatched_single_file_is_refused(tmp_path: Path) -> None:
    folder = _copy("sd1file", tmp_path)
    shutil.rmtree(folder / "config")
    shutil.copytree(tiny_sd_store() / "sdxlfile" / "config", folder / "config")  # SDXL configs, SD1 weights
    with pytest.raises(SDLoadError, match=r"model\.safetensors"):
        ModelStore(tmp_path / "store").load("sd1file")


def test_pickle_is_refused_unless_allowed_then_weights_only(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    folder = _copy("sd1file", tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    torch.save({"state_dict": state}, folder / "model.ckpt")
    write_manifest(folder, weights="model.ckpt", config="config")
    store = ModelStore(tmp_path / "store")
    with pytest.raises(SDLoadError, match=r"model\.ckpt is a pickle checkpoint.*allow_pickle"):
        store.load("sd1file")
    write_manifest(folder, weights="model.ckpt", config="config", allow_pickle=True)
    assert store.load("sd1file").info["source"] == "single_file"

    class Evil:
        def __reduce__(self) -> tuple:
            return (print, ("pwned",))

    torch.save({"state_dict": state, "x": Evil()}, folder / "model.ckpt")
    with pytest.raises(SDLoadError, match="refused or unreadable"):
        store.load("sd1file")


def test_manifest_prediction_type_overrides_the_scheduler_config(tmp_path: Path) -> None:
    folder = _copy("sd1", tmp_path)
    write_manifest(folder, prediction_type="v_prediction")
    assert ModelStore(tmp_path / "store").load("sd1").info["prediction_type"] == "v_prediction"
    write_manifest(folder, prediction_type="sample")
    with pytest.raises(SDLoadError, match="prediction_type"):
        ModelStore(tmp_path / "store").load("sd1")

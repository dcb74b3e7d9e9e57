"""Trainer on a tiny UNet over 8x8 digits: learning, exact resume, interrupt, NaN and config errors."""

from __future__ import annotations

import json

import pytest
import torch

from service.cli import main as kdiff
from service.models.unet import UNetConfig
from service.training.datasets import DatasetError, ImageData, digits
from service.training.trainer import TrainConfig, Trainer, TrainingError, ema_decay

TINY = dict(
    image_size=8,
    widths=[8, 16],
    depths=[1, 1],
    self_attn=[False, True],
    mapping_dim=16,
    groups=4,
    head_dim=8,
    num_classes=10,
)


@pytest.fixture(scope="module")
def data() -> ImageData:
    return digits("train", 8)


def make(tmp_path, data: ImageData, **kw) -> Trainer:
    tc = TrainConfig(
        **{
            "out": str(tmp_path / "run"),
            "batch_size": 16,
            "checkpoint_every": 0,
            "warmup_steps": 1,
            "lr": 2e-3,
            **kw,
        }
    )
    return Trainer(UNetConfig(**TINY), tc, data, log=lambda s: None)


def test_loss_decreases(tmp_path, data) -> None:
    t = make(tmp_path, data, steps=60, batch_size=32)
    for _ in range(60):
        t.train_step()
    first, last = sum(t.losses[:10]) / 10, sum(t.losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)


def test_resume_reproduces_the_loss_sequence(tmp_path, data) -> None:
    straight = make(tmp_path / "a", data, steps=6)
    straight.train(progress=False)
    part = make(tmp_path / "b", data, steps=3)
    part.train(progress=False)
    resumed = make(tmp_path / "b", data, steps=6)
    resumed.resume()
    assert resumed.step == 3 and resumed.train_seconds == part.train_seconds
    resumed.train(progress=False)
    assert resumed.train_seconds > part.train_seconds  # wall time accumulates across resumes
    assert resumed.losses == straight.losses  # bit-identical, not just close
    for p, q in zip(resumed.ema.parameters(), straight.ema.parameters(), strict=True):
        assert torch.equal(p, q)
    assert (tmp_path / "b" / "run" / "samples" / "step_000006.png").exists()


def test_output_folder_is_a_loadable_model(tmp_path, data) -> None:
    from service.models.unet import load_denoiser

    t = make(tmp_path, data, steps=2)
    t.train(progress=False)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["kind"] == "unet" and manifest["weights"] == "model.safetensors"
    den, cfg = load_denoiser(tmp_path / "run")
    out = den(torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0]), class_cond=torch.tensor([3, 10]))
    assert out.shape == (2, 1, 8, 8) and cfg.num_classes == 10


def test_ctrl_c_writes_a_checkpoint(tmp_path, data, monkeypatch) -> None:
    t = make(tmp_path, data, steps=10)
    original = t.train_step

    def step_then_interrupt() -> float:
        if t.step == 3:
            raise KeyboardInterrupt
        return original()

    monkeypatch.setattr(t, "train_step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        t.train(progress=False)
    assert json.loads((tmp_path / "run" / "state.json").read_text())["step"] == 3


def test_nan_loss_names_the_step(tmp_path, data) -> None:
    t = make(tmp_path, data, steps=5)
    t.train_step()
    t.data = ImageData(torch.full_like(data.images, float("nan")), data.labels, 10)
    with pytest.raises(TrainingError, match="at step 1"):
        t.train_step()


def test_bf16_accumulation_and_karras_augmentation_run(tmp_path, data) -> None:
    tc = TrainConfig(
        out=str(tmp_path),
        batch_size=8,
        grad_accum=2,
        precision="bf16",
        augment="karras",
        aug_prob=0.5,
        weighting="soft-min-snr",
        sigma_density="log-logistic",
    )
    t = Trainer(UNetConfig(**TINY, has_aug_cond=True), tc, data)
    assert torch.isfinite(torch.tensor([t.train_step(), t.train_step()])).all()


def test_config_and_dataset_errors(tmp_path, data) -> None:
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        TrainConfig(precision="fp16", device="cpu")
    with pytest.raises(DatasetError, match="model expects"):
        Trainer(UNetConfig(**{**TINY, "image_size": 16}), TrainConfig(), data)
    with pytest.raises(DatasetError, match="num_classes"):
        Trainer(UNetConfig(**{**TINY, "num_classes": 3}), TrainConfig(), data)
    with pytest.raises(DatasetError, match="empty"):
        Trainer(UNetConfig(**TINY), TrainConfig(), ImageData(data.images[:0], data.labels[:0], 10))
    with pytest.raises(ValueError, match="has_aug_cond"):
        Trainer(UNetConfig(**TINY), TrainConfig(augment="karras"), data)


def test_ema_decay_warms_up() -> None:
    values = [ema_decay(s, 2 / 3, 0.999) for s in (0, 1, 10, 100, 10**6)]
    assert values[0] == 0.0 and values == sorted(values) and values[-1] == 0.999


def test_cli_trains_and_reports_errors(tmp_path, capsys) -> None:
    cfg = tmp_path / "unet.json"
    cfg.write_text(json.dumps(TINY))
    out = tmp_path / "cli"
    rc = kdiff(
        [
            "train",
            "--model-config",
            str(cfg),
            "--out",
            str(out),
            "--steps",
            "2",
            "--batch-size",
            "8",
            "--no-progress",
        ]
    )
    assert rc == 0 and (out / "model.safetensors").exists() and (out / "samples" / "step_000002.png").exists()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**TINY, "colour": "blue"}))
    assert kdiff(["train", "--model-config", str(bad), "--out", str(out), "--steps", "1"]) == 1
    assert "unknown UNet config keys ['colour']" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert kdiff(["train", "--dataset", str(empty), "--model-config", str(cfg)]) == 1
    assert "no images" in capsys.readouterr().err

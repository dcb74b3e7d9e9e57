"""`kdiff train --lora-rank R --init FOLDER`: a LoRA for the project's UNet, trained on a subset of the
digits, written in kohya format into the model's loras/ folder, where the service picks it up."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from service.models.lora import LoraIndex, attach, read_lora
from service.models.store import ModelStore
from service.training.cli import add_arguments, main
from tests.support.tiny_store import make_tiny_store


def test_train_a_lora_and_serve_it(tmp_path: Path) -> None:
    make_tiny_store(tmp_path, name="tiny")
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(
        [
            "--lora-rank",
            "2",
            "--init",
            str(tmp_path / "tiny"),
            "--lora-classes",
            "7",
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--lr",
            "0.01",
            "--no-progress",
        ]  # fmt: skip
    )
    assert main(args) == 0
    path = tmp_path / "tiny" / "loras" / "lora.safetensors"
    layers, fmt, meta = read_lora(path)
    assert fmt == "kohya" and meta["ss_network_dim"] == "2" and layers["unet"]
    model = ModelStore(tmp_path).load("tiny")
    adapters = attach(model, LoraIndex(tmp_path))
    assert adapters is not None and adapters.available() == ["lora"]
    resolved = adapters.resolve([("lora", 1.0)])
    x, sigma, labels = torch.randn(2, 1, 8, 8), torch.tensor([2.0, 0.5]), torch.tensor([7, 7])
    with torch.inference_mode():
        base = model.denoiser(x, sigma, class_cond=labels)
        with adapters.call(adapters.encode(resolved, 2)):
            tuned = model.denoiser(x, sigma, class_cond=labels)
    assert (tuned - base).abs().max() > 1e-4

"""LoRA files as people keep them: names as Civitai gives them, a file rewritten by a new training
run under the same name, and A1111's separate text-encoder and UNet weights in a tag."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")

from service.models.lora import LoraIndex, attach, text_loras  # noqa: E402
from service.models.lora.adapters import live  # noqa: E402
from service.models.store import ModelStore  # noqa: E402
from service.serving.loras import request_loras  # noqa: E402
from service.serving.request import GenerationRequest  # noqa: E402
from tests.support.lora_files import kohya_file, save  # noqa: E402
from tests.support.sd_tiny import tiny_sd_store  # noqa: E402


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    shutil.copytree(tiny_sd_store() / "sd1", root / "sd1")
    return root


def _model(root: Path) -> Any:
    model = ModelStore(root).load("sd1")
    attach(model, LoraIndex(root))
    return model


def _lora(model: Any, root: Path, name: str, seed: int) -> Path:
    sd = model.text_model
    return save(
        kohya_file(sd.unet, sd.components.text_encoders, seed), root / "loras" / f"{name}.safetensors"
    )


def _context(model: Any, resolved: list[tuple[int, float]], prompt: str) -> torch.Tensor:
    with text_loras(model, resolved):
        return model.text_model.job_inputs(prompt, None, n=1, cfg_scale=1.0).cond["context"]


def test_names_as_downloads_keep_them_are_listed(store: Path) -> None:
    """A1111 lists any file stem; names that cannot be written in a tag or a path are left out."""
    model = _model(store)
    listed = ["detail_tweaker(v1.5)", "国风", "[LoCon] style", "it's, 2"]
    for name in [*listed, " padded", "a:b", ".hidden"]:
        _lora(model, store, name, 0)
    assert sorted(i.name for i in LoraIndex(store).scan()) == sorted(listed)
    req, resolved = request_loras(
        GenerationRequest(model="sd1", prompt="a cat <lora:detail_tweaker(v1.5):0.5>"), model
    )
    assert req.prompt == "a cat" and [w for _, w in resolved.unet] == [0.5]


def test_a_rewritten_file_is_read_again(store: Path) -> None:
    """A new training run saved under the same name: the next request uses the new weights (the
    cache is keyed by the file's mtime and size, as A1111 rereads a file whose mtime moved)."""
    model = _model(store)
    path = _lora(model, store, "retrained", 1)
    (first,) = model.adapters.resolve([("retrained", 1.0)])
    old = _context(model, [first], "a dog")
    _lora(model, store, "retrained", 2)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a later save, whatever the clock
    (second,) = model.adapters.resolve([("retrained", 1.0)])
    new = _context(model, [second], "a dog")
    fresh = _model(store)
    want = _context(fresh, fresh.adapters.resolve([("retrained", 1.0)]), "a dog")
    assert second != first and not torch.equal(new, old)
    assert torch.allclose(new, want, atol=1e-6), float((new - want).abs().max())


def test_a_tags_unet_weight_is_its_own(store: Path) -> None:
    """``<lora:x:1:0>``: the text encoders at 1, the UNet at 0 (A1111's te / unet multipliers)."""
    model = _model(store)
    _lora(model, store, "x", 3)
    _, split = request_loras(GenerationRequest(model="sd1", prompt="a cat <lora:x:1:0>"), model)
    _, both = request_loras(GenerationRequest(model="sd1", prompt="a cat <lora:x:1>"), model)
    assert [w for _, w in split.text] == [1.0] and [w for _, w in split.unet] == [0.0]
    assert not live(model.adapters.encode(split.unet, 1)) and live(model.adapters.encode(both.unet, 1))
    plain = _context(model, [], "a cat")
    assert not torch.equal(_context(model, split.text, "a cat"), plain)
    assert torch.equal(_context(model, split.text, "a cat"), _context(model, both.text, "a cat"))

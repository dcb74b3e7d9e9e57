"""LoRA on the project's own UNet, end to end: per-row updates equal merged weights, GET /loras and
/sdapi/v1/loras list the files, requests name LoRAs by field or <lora:name:w> tag (422 for an unknown
one), and concurrent requests with different LoRAs share model calls while each image equals the same
request run alone."""

from __future__ import annotations

import base64
import copy
import io
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service.api.app import create_app
from service.api.settings import Settings
from service.models.lora import LoraIndex, attach
from service.models.store import ModelStore
from tests.support.lora_files import every_layer, kohya_state, peft_state, random_layers, save
from tests.support.tiny_store import make_tiny_store


def _store(tmp_path: Path) -> ModelStore:
    make_tiny_store(tmp_path, name="tiny")
    store = ModelStore(tmp_path)
    unet = store.load("tiny").denoiser.inner_model
    save(
        kohya_state({"unet": random_layers(unet, 4, 1, every_layer, std=0.6)}, 2.0),
        tmp_path / "loras" / "a.safetensors",
    )
    save(
        peft_state({"unet": random_layers(unet, 4, 2, every_layer, std=0.6)}),
        tmp_path / "tiny" / "loras" / "b.safetensors",
    )
    return store


def test_per_row_equals_merged_weights_on_the_project_unet(tmp_path: Path) -> None:
    store = _store(tmp_path)
    model = store.load("tiny")
    merged = copy.deepcopy(model.denoiser)
    adapters = attach(model, LoraIndex(tmp_path))
    assert adapters is not None
    resolved = adapters.resolve([("a", 0.5)])
    layers = adapters._adapters[resolved[0][0]]["unet"].layers  # (down, up * alpha / rank) per layer
    with torch.no_grad():
        for name, m in merged.inner_model.named_modules():
            w = layers.get(name.replace(".", "_"))
            if w is not None:
                down, up = w
                m.weight += (up.flatten(1) @ down.flatten(1)).view(m.weight.shape) * 0.5
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([5.0, 1.0, 0.1])
    labels = torch.tensor([1, 2, 3])
    with torch.inference_mode():
        with adapters.call(adapters.encode(resolved, 3)):
            ours = model.denoiser(x, sigma, class_cond=labels)
        want = merged(x, sigma, class_cond=labels)
        base = model.denoiser(x, sigma, class_cond=labels)
    assert (want - base).abs().max() > 1e-3
    assert (ours - want).abs().max() <= 1e-5


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.int16)


def _mean_rows(metrics: str) -> tuple[float, float]:
    total = float(re.search(r'kdiff_batch_rows_sum\{model="tiny"\} (\S+)', metrics).group(1))  # type: ignore[union-attr]
    count = float(re.search(r'kdiff_batch_rows_count\{model="tiny"\} (\S+)', metrics).group(1))  # type: ignore[union-attr]
    return total, count


def test_concurrent_requests_with_different_loras_share_calls(tmp_path: Path) -> None:
    store = _store(tmp_path)
    settings = Settings(model_store=tmp_path, torch_threads=1, batch_wait_ms=300)
    bodies: list[dict[str, Any]] = [
        {"class_label": 1},
        {"class_label": 2, "loras": [{"name": "a", "weight": 0.8}]},
        {"class_label": 3, "loras": [{"name": "b", "weight": 1.0}]},
        {"class_label": 4, "loras": [{"name": "a", "weight": 0.5}, {"name": "b", "weight": 0.5}]},
    ]
    for b in bodies:
        b.update(steps=4, seed=7, sampler="euler")
    with TestClient(create_app(settings, store)) as c:
        listing = {i["name"]: i for i in c.get("/loras").json()["loras"]}
        assert listing["a"]["base_model"] is None and listing["b"]["base_model"] == "tiny"
        assert {i["name"] for i in c.get("/sdapi/v1/loras").json()} == {"a", "b"}
        r = c.post("/sample", json={**bodies[0], "loras": [{"name": "zzz", "weight": 1}]})
        assert r.status_code == 422 and "zzz" in r.json()["detail"][0]["msg"]
        assert r.json()["detail"][0]["loc"] == ["body", "loras"]
        solo = [c.post("/sample", json=b).json() for b in bodies]
        assert solo[1]["parameters"]["loras"] == [{"name": "a", "weight": 0.8}]
        before = _mean_rows(c.get("/metrics").text)
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda b: c.post("/sample", json=b).json(), bodies))
        after = _mean_rows(c.get("/metrics").text)
        plain = c.post("/sample", json={**bodies[1], "loras": None}).json()
        tagged = c.post("/sample", json={**bodies[1], "loras": None, "prompt": "x <lora:a:0.8>"})
        assert tagged.status_code == 422 and tagged.json()["detail"][0]["loc"] == ["body", "prompt"]
    rows, calls = after[0] - before[0], after[1] - before[1]
    assert rows == 16 and calls < 16, f"{rows} rows in {calls} calls: the requests did not share calls"
    for s, t in zip(solo, together, strict=True):
        assert np.abs(_pixels(s["images"][0]) - _pixels(t["images"][0])).max() <= 1
    assert np.abs(_pixels(plain["images"][0]) - _pixels(solo[1]["images"][0])).max() > 10  # the LoRA acts

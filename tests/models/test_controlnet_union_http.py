"""ControlNet-Union (SDXL) over HTTP on tiny random models in the real layout: /sample against
diffusers' StableDiffusionXLControlNetUnionPipeline (same seed noise and Euler sigmas, one image and
several images with their types) within 2/255; A1111's ``union_control_type`` is our
``control_type``; the 422s (a union ControlNet for an SD 1.x model, an unknown control type) in each
API's error shape, naming what is allowed."""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")

from diffusers import EulerDiscreteScheduler  # noqa: E402

from service.models.store import ModelStore  # noqa: E402
from service.sampling.noise import NoiseSource  # noqa: E402
from tests.models.test_controlnet_diffusers import control_png, png_image  # noqa: E402
from tests.support.app_client import app_client
from tests.support.union_tiny import union_reference, union_store  # noqa: E402

STEPS, CFG, SEED = 4, 5.0, 11
BASE = {"prompt": "a red cat", "negative_prompt": "the dog", "cfg_scale": CFG, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("union-http")
    return root, union_store(root)


@pytest.fixture(scope="module")
def client(root: tuple[Path, dict[str, Any]]) -> Iterator[TestClient]:
    with app_client(root[0], batch_wait_ms=300) as c:
        yield c


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(png_image(b64), dtype=np.int16)


def _post(client: TestClient, path: str, body: dict[str, Any]) -> str:
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()["images"][0]  # type: ignore[no-any-return]


@pytest.mark.parametrize(("name", "modes", "weight"), [("union_xl", [3], 0.9), ("union_promax", [1, 6], 0.7)])
def test_sample_matches_diffusers_union_pipeline(
    client: TestClient, root: tuple[Path, dict[str, Any]], name: str, modes: list[int], weight: float
) -> None:
    store, nets = root
    sd = ModelStore(store).load("sdxl").text_model  # type: ignore[attr-defined]
    scheduler = EulerDiscreteScheduler.from_config(sd.components.scheduler_config)
    scheduler.set_timesteps(STEPS)
    sigmas = [float(s) for s in scheduler.sigmas]
    images = [control_png(8 + i) for i in range(len(modes))]
    noise = NoiseSource([SEED]).randn((4, 8, 8), "cpu", torch.float32)
    control = {"control_image": [png_image(i) for i in images], "control_mode": modes}
    ref = union_reference(
        sd,
        nets[name],
        scheduler,
        noise,
        control | {"controlnet_conditioning_scale": weight},
        num_inference_steps=STEPS,
        guidance_scale=CFG,
        output_type="np",
    )[0]
    unit = {"model": name, "image": images[0], "control_type": modes[0], "weight": weight}
    unit["images"] = [{"image": i, "control_type": m} for i, m in zip(images[1:], modes[1:], strict=True)]
    body = {"model": "sdxl", "sampler": "euler", "sigmas": sigmas, "seed": SEED, **BASE}
    ours = _pixels(_post(client, "/sample", {**body, "controlnets": [unit]}))
    want = np.round(ref * 255).astype(np.int16)
    assert np.abs(ours - want).max() <= 2
    plain = _pixels(_post(client, "/sample", body))
    assert np.abs(plain - want).max() > 2  # the unit acted (on the latents: test_controlnet_union)


def _rows(metrics: str) -> tuple[float, float]:
    """kdiff_batch_rows' sum and count for the sdxl model (rows over model calls)."""
    found = [re.search(rf'kdiff_batch_rows_{k}\{{model="sdxl"\}} (\S+)', metrics) for k in ("sum", "count")]
    return float(found[0].group(1)), float(found[1].group(1))  # type: ignore[union-attr]


def test_concurrent_union_requests_share_calls(client: TestClient) -> None:
    """none / union canny / union depth (1.5, ControlNet more important) / ProMax openpose + tile,
    concurrently: fewer model calls than rows' steps (/metrics), each image as its solo run; A1111's
    /controlnet/control_types lists the union models under the types they serve."""
    union = {"model": "union_promax", "image": control_png(1)}
    units: list[list[dict[str, Any]]] = [
        [],
        [{**union, "control_type": "canny"}],
        [{**union, "control_type": "depth", "weight": 1.5, "control_mode": "control"}],
        [
            {
                **union,
                "control_type": "openpose",
                "images": [{"image": control_png(2), "control_type": "tile"}],
            }
        ],
    ]
    bodies = [
        {"model": "sdxl", "steps": STEPS, "seed": 3, "sampler": "euler", **BASE, "controlnets": u}
        for u in units
    ]
    solo = [_pixels(_post(client, "/sample", b)) for b in bodies]
    before = _rows(client.get("/metrics").text)
    with ThreadPoolExecutor(4) as pool:
        together = [_pixels(p) for p in pool.map(lambda b: _post(client, "/sample", b), bodies)]
    after = _rows(client.get("/metrics").text)
    rows, calls = after[0] - before[0], after[1] - before[1]
    assert rows == 4 * 2 * STEPS and calls < 4 * STEPS, f"{rows} rows in {calls} calls: no sharing"
    for s, t in zip(solo, together, strict=True):
        assert np.abs(s - t).max() <= 1
    assert all(np.abs(solo[0] - s).max() > 2 for s in solo[1:])  # each unit acts
    kinds = client.get("/controlnet/control_types").json()["control_types"]
    assert {"union_xl", "union_promax"} <= set(kinds["Canny"]["model_list"])  # the extension's "union" rule
    assert "union_xl" not in kinds["Shuffle"]["model_list"]


def _a1111(client: TestClient, model: str, unit: dict[str, Any], **body: Any) -> Any:
    """sd-webui-controlnet's txt2img body with one unit (as webuiapi's ControlNetUnit.to_dict sends it)."""
    scripts = {"ControlNet": {"args": [unit]}}
    checkpoint = {"sd_model_checkpoint": model}
    defaults = {"prompt": "x", "width": 64, "height": 64}
    return client.post(
        "/sdapi/v1/txt2img",
        json=defaults | body | {"override_settings": checkpoint, "alwayson_scripts": scripts},
    )


def test_a1111_union_control_type_is_our_control_type(client: TestClient) -> None:
    """webuiapi's ControlNetUnit(union_control_type="Hard Edge") (sd-webui-controlnet's
    ControlNetUnionControlType values) -> our unit with control_type canny; "Unknown" -> auto."""
    image = control_png(3)
    seen = {}
    for kind, ours_kind in (("Hard Edge", "canny"), ("Unknown", "auto")):
        unit = {"model": "union_xl", "image": image, "module": "none", "union_control_type": kind}
        a1111 = _a1111(client, "sdxl", unit, **BASE, steps=3, seed=5, sampler_name="Euler")
        assert a1111.status_code == 200, a1111.text
        seen[kind] = _pixels(a1111.json()["images"][0])
        ours_unit = {"model": "union_xl", "image": image, "control_type": ours_kind, "resize_mode": 0}
        body = {
            "model": "sdxl",
            "sampler": "euler",
            "steps": 3,
            "seed": 5,
            **BASE,
            "controlnets": [ours_unit],
        }
        assert np.abs(seen[kind] - _pixels(_post(client, "/sample", body))).max() <= 1
    assert np.abs(seen["Hard Edge"] - seen["Unknown"]).max() > 2


@pytest.mark.parametrize(
    ("model", "unit", "listed"),
    [
        ("sd1", {"model": "union_xl", "control_type": "canny"}, "union_xl"),
        ("sdxl", {"model": "union_xl", "control_type": "fisheye"}, "segment"),
        ("sdxl", {"model": "union_xl", "control_type": "repaint"}, "openpose"),
    ],
)
def test_bad_union_units_are_422(client: TestClient, model: str, unit: dict[str, Any], listed: str) -> None:
    r = client.post(
        "/sample",
        json={"model": model, "prompt": "x", "steps": 2, "controlnets": [{"image": control_png(1), **unit}]},
    )
    assert r.status_code == 422, r.text
    assert ("model" if model == "sd1" else "control_type") in str(r.json()["detail"])
    assert listed in r.text and ("SDXL" in r.text if model == "sd1" else "auto" in r.text)
    a1111_unit = {"image": control_png(1), "model": unit["model"], "union_control_type": unit["control_type"]}
    a = _a1111(client, model, a1111_unit, steps=2)
    assert a.status_code == 422 and listed in a.text, a.text

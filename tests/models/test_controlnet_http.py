"""ControlNet over HTTP on tiny random models saved in the real layouts (diffusers folders and one
original single file): /sample against diffusers' StableDiffusion(XL)ControlNetPipeline with the same
seed noise and sigmas (within 2/255), concurrent requests with different units sharing UNet calls
(/metrics) with each image equal to its solo run, A1111's alwayson_scripts and /controlnet routes,
and the 422s naming what is allowed."""

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

from diffusers import (  # noqa: E402
    EulerDiscreteScheduler,
)

from service.models.store import ModelStore  # noqa: E402
from service.sampling.noise import NoiseSource  # noqa: E402
from tests.models.test_controlnet_diffusers import control_png, png_image  # noqa: E402
from tests.support.app_client import app_client
from tests.support.controlnet_tiny import add_controlnets  # noqa: E402
from tests.support.sd_tiny import diffusers_pipeline, save_diffusers, write_manifest  # noqa: E402

STEPS, CFG, SEED = 4, 5.0, 11


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("cn-http")
    for name, kw in (("sd1", {}), ("sdxl", {"sdxl": True})):
        save_diffusers(root / name, **kw)
        write_manifest(root / name)
    return root, add_controlnets(root)


@pytest.fixture(scope="module")
def client(root: tuple[Path, dict[str, Any]]) -> Iterator[TestClient]:
    with app_client(root[0], batch_wait_ms=300) as c:
        yield c


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(png_image(b64), dtype=np.int16)


def _post(client: TestClient, path: str = "/sample", **body: Any) -> dict[str, Any]:
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("model", "cn"), [("sd1", "cn_a"), ("sd1", "control_v11p_sd15_tiny"), ("sdxl", "cn_xl")]
)
def test_sample_matches_diffusers_controlnet_pipeline(
    client: TestClient, root: tuple[Path, dict[str, Any]], model: str, cn: str
) -> None:
    store, nets = root
    sd = ModelStore(store).load(model).text_model  # type: ignore[attr-defined]
    c = sd.components
    scheduler = EulerDiscreteScheduler.from_config(c.scheduler_config)
    scheduler.set_timesteps(STEPS)
    sigmas = [float(s) for s in scheduler.sigmas]
    image = control_png(8)
    noise = NoiseSource([SEED]).randn((4, 8, 8), "cpu", torch.float32)
    pipe = diffusers_pipeline(sd, scheduler, nets[cn])
    with torch.inference_mode():
        ref = pipe(
            "a red cat",
            negative_prompt="the dog",
            image=png_image(image),
            num_inference_steps=STEPS,
            guidance_scale=CFG,
            height=64,
            width=64,
            latents=noise.clone(),
            output_type="np",
            controlnet_conditioning_scale=0.9,
        ).images[0]
    out = _post(
        client,
        model=model,
        prompt="a red cat",
        negative_prompt="the dog",
        sampler="euler",
        sigmas=sigmas,
        seed=SEED,
        cfg_scale=CFG,
        width=64,
        height=64,
        controlnets=[{"model": cn, "image": image, "weight": 0.9}],
    )
    want = np.round(ref * 255).astype(np.int16)
    assert np.abs(_pixels(out["images"][0]) - want).max() <= 2


def _rows(metrics: str) -> tuple[float, float]:
    total = float(re.search(r'kdiff_batch_rows_sum\{model="sd1"\} (\S+)', metrics).group(1))  # type: ignore[union-attr]
    count = float(re.search(r'kdiff_batch_rows_count\{model="sd1"\} (\S+)', metrics).group(1))  # type: ignore[union-attr]
    return total, count


def test_concurrent_requests_with_different_units_share_calls(client: TestClient) -> None:
    unit_a = {"model": "cn_a", "image": control_png(1)}
    unit_b = {"model": "control_v11p_sd15_tiny", "image": control_png(2), "weight": 0.7, "control_mode": 1}
    bodies: list[dict[str, Any]] = [
        {},
        {"controlnets": [unit_a]},
        {"controlnets": [unit_b]},
        {"controlnets": [{**unit_a, "guidance_end": 0.5}, unit_b]},
    ]
    for b in bodies:
        b.update(model="sd1", prompt="a red cat", steps=STEPS, seed=3, sampler="euler", width=64, height=64)
    solo = [_post(client, **b) for b in bodies]
    before = _rows(client.get("/metrics").text)
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda b: _post(client, **b), bodies))
    after = _rows(client.get("/metrics").text)
    rows, calls = after[0] - before[0], after[1] - before[1]
    assert rows == 4 * 2 * STEPS and calls < 4 * STEPS, f"{rows} rows in {calls} calls: no sharing"
    for s, t in zip(solo, together, strict=True):
        assert np.abs(_pixels(s["images"][0]) - _pixels(t["images"][0])).max() <= 1
    assert np.abs(_pixels(solo[0]["images"][0]) - _pixels(solo[1]["images"][0])).max() > 2  # the unit acts


def test_a1111_alwayson_controlnet_is_our_unit(client: TestClient) -> None:
    image = control_png(4)
    a1111 = _post(
        client,
        "/sdapi/v1/txt2img",
        prompt="a red cat",
        steps=STEPS,
        seed=5,
        sampler_name="Euler",
        cfg_scale=CFG,
        width=64,
        height=64,
        override_settings={"sd_model_checkpoint": "sd1"},
        alwayson_scripts={
            "controlnet": {
                "args": [
                    {
                        "enabled": True,
                        "module": "none",
                        "model": "cn_b [abcd1234]",
                        "weight": 0.8,
                        "image": image,
                        "resize_mode": "Just Resize",
                        "guidance_start": 0.0,
                        "guidance_end": 1.0,
                        "control_mode": "My prompt is more important",
                        "processor_res": -1,
                        "threshold_a": -1,
                    },
                    {"enabled": False, "model": "cn_a", "image": image},
                ]
            }
        },
    )
    ours = _post(
        client,
        model="sd1",
        prompt="a red cat",
        steps=STEPS,
        seed=5,
        sampler="euler",
        cfg_scale=CFG,
        width=64,
        height=64,
        controlnets=[
            {"model": "cn_b", "image": image, "weight": 0.8, "control_mode": "prompt", "resize_mode": 0}
        ],
    )
    assert np.abs(_pixels(a1111["images"][0]) - _pixels(ours["images"][0])).max() <= 1


def test_controlnet_routes(client: TestClient) -> None:
    models = client.get("/controlnet/model_list").json()["model_list"]
    assert models == sorted(["cn_a", "cn_b", "cn_xl", "control_v11p_sd15_tiny"])
    assert "canny" in client.get("/controlnet/module_list").json()["module_list"]
    assert client.get("/controlnet/version").json()["version"] >= 2
    assert client.get("/controlnet/settings").json() == {"control_net_unit_count": 3}
    types = client.get("/controlnet/control_types").json()["control_types"]
    assert types["Canny"]["default_option"] == "canny"
    r = client.post(
        "/controlnet/detect",
        json={
            "controlnet_module": "canny",
            "controlnet_input_images": [control_png(3)],
            "controlnet_threshold_a": 50,
            "controlnet_threshold_b": 120,
        },
    )
    assert r.status_code == 200 and set(np.unique(_pixels(r.json()["images"][0]))) <= {0, 255}
    bad = client.post(
        "/controlnet/detect", json={"controlnet_module": "depth_midas", "controlnet_input_images": ["x"]}
    )
    assert bad.status_code == 422 and "canny" in bad.text


@pytest.mark.parametrize(
    ("unit", "field", "listed"),
    [
        ({"model": "nope"}, "model", "cn_a"),
        ({"model": "cn_a", "module": "openpose"}, "module", "canny"),
        ({"model": "cn_xl"}, "model", "SDXL"),
        ({"model": "cn_a", "control_mode": "loud"}, "control_mode", "Balanced"),
    ],
)
def test_bad_units_are_422_naming_the_field(
    client: TestClient, unit: dict[str, Any], field: str, listed: str
) -> None:
    r = client.post(
        "/sample",
        json={"model": "sd1", "prompt": "x", "steps": 2, "controlnets": [{"image": control_png(1), **unit}]},
    )
    assert r.status_code == 422, r.text
    assert field in str(r.json()["detail"]) and listed in r.text
    a = client.post(
        "/sdapi/v1/txt2img",
        json={
            "prompt": "x",
            "steps": 2,
            "width": 64,
            "height": 64,
            "override_settings": {"sd_model_checkpoint": "sd1"},
            "alwayson_scripts": {"ControlNet": {"args": [{"image": control_png(1), **unit}]}},
        },
    )
    assert a.status_code == 422 and listed in a.text


def test_control_image_bomb_is_refused(client: TestClient) -> None:
    import base64

    from tests.support.hostile_images import bomb_png

    bomb = base64.b64encode(bomb_png(12000, 12000)).decode()
    r = client.post(
        "/sample",
        json={"model": "sd1", "prompt": "x", "steps": 2, "controlnets": [{"model": "cn_a", "image": bomb}]},
    )
    assert r.status_code in (413, 422) and "image" in r.text


def test_hires_fix_second_pass_keeps_the_unit(client: TestClient) -> None:
    """A1111's hires fix with a unit runs (the second pass builds its rows at the hires size and binds
    its own sigmas) and the unit changes the result."""
    base = {
        "prompt": "a red cat",
        "steps": 3,
        "seed": 2,
        "sampler_name": "Euler",
        "width": 64,
        "height": 64,
        "enable_hr": True,
        "hr_scale": 2,
        "hr_upscaler": "Latent",
        "denoising_strength": 0.6,
        "override_settings": {"sd_model_checkpoint": "sd1"},
    }
    unit = {"model": "cn_a", "image": control_png(7), "guidance_end": 0.5}
    with_unit = _post(client, "/sdapi/v1/txt2img", **base, alwayson_scripts={"ControlNet": {"args": [unit]}})
    without = _post(client, "/sdapi/v1/txt2img", **base)
    a, b = _pixels(with_unit["images"][0]), _pixels(without["images"][0])
    assert a.shape == (128, 128, 3) and np.abs(a - b).max() > 2

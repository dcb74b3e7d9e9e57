"""POST /sample: JSON and PNG responses, reproducibility from the PNG's parameters, img2img."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service.images import read_parameters
from service.models.traced import TracedModule


def _png(b64: str) -> bytes:
    return base64.b64decode(b64)


def _pixels(png: bytes) -> bytes:
    return Image.open(io.BytesIO(png)).tobytes()


def test_sample_json_returns_pngs_that_carry_their_parameters(client: TestClient) -> None:
    body = {"class_label": 3, "steps": 6, "seed": 41, "n": 2, "cfg_scale": 2.0, "sampler": "dpmpp_2m"}
    r = client.post("/sample", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["seeds"] == [41, 42] and len(data["images"]) == 2
    assert data["parameters"]["sampler"] == "dpmpp_2m" and data["parameters"]["model"] == "tiny"
    assert data["timings"]["total_s"] > 0
    first = _png(data["images"][0])
    img = Image.open(io.BytesIO(first))
    assert img.size == (8, 8) and img.mode == "L"
    params = read_parameters(first)
    assert params["seed"] == 41 and params["steps"] == 6 and params["class_label"] == 3
    # the PNG's parameters are enough to reproduce the image
    again = client.post(
        "/sample",
        json={k: params[k] for k in ("sampler", "schedule", "steps", "cfg_scale", "class_label", "seed")},
    )
    assert again.status_code == 200
    assert _pixels(_png(again.json()["images"][0])) == _pixels(first)
    other_seed = client.post("/sample", json={**body, "seed": 7, "n": 1}).json()
    assert _pixels(_png(other_seed["images"][0])) != _pixels(first)


def test_sample_png_with_accept_header_is_a_grid(client: TestClient) -> None:
    r = client.post(
        "/sample", json={"steps": 3, "seed": [1, 2, 3, 4], "class_label": 1}, headers={"Accept": "image/png"}
    )
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png" and r.headers["x-seeds"] == "1,2,3,4"
    img = Image.open(io.BytesIO(r.content))
    assert img.size == (16, 16)
    assert read_parameters(r.content)["seeds"] == [1, 2, 3, 4]


def test_img2img_and_inpainting(client: TestClient) -> None:
    buf = io.BytesIO()
    Image.new("L", (20, 20), color=255).save(buf, format="PNG")
    init = base64.b64encode(buf.getvalue()).decode()
    mask_buf = io.BytesIO()
    Image.new("L", (8, 8), color=0).save(mask_buf, format="PNG")  # black: keep everything
    mask = base64.b64encode(mask_buf.getvalue()).decode()
    r = client.post("/sample", json={"steps": 4, "seed": 0, "init_image": init, "denoise": 0.3})
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["img2img"] is True
    r = client.post("/sample", json={"steps": 4, "seed": 0, "init_image": init, "mask": mask})
    assert r.status_code == 200, r.text
    img = Image.open(io.BytesIO(_png(r.json()["images"][0])))
    assert min(img.getdata()) >= 250  # the kept region is the white init image


def test_deadline_gives_504(client: TestClient) -> None:
    r = client.post("/sample", json={"steps": 500, "sampler": "heunpp2", "timeout_s": 0.05})  # ~1 s of work
    assert r.status_code == 504
    assert r.json()["detail"]["code"] == "deadline_exceeded"


def test_peer_spellings_resolve_to_our_names(client: TestClient) -> None:
    """A1111/ComfyUI names work over HTTP; the name's schedule applies unless the request gives one."""
    base = {"class_label": 4, "steps": 4, "seed": 2}
    r = client.post("/sample", json={**base, "sampler": "DPM++ 2M Karras"})
    assert r.status_code == 200, r.text
    assert (r.json()["parameters"]["sampler"], r.json()["parameters"]["schedule"]) == ("dpmpp_2m", "karras")
    ours = client.post("/sample", json={**base, "sampler": "dpmpp_2m", "schedule": "karras"}).json()
    assert _pixels(_png(r.json()["images"][0])) == _pixels(_png(ours["images"][0]))
    r = client.post("/sample", json={**base, "sampler": "Euler a", "schedule": "Exponential"})
    assert r.status_code == 200, r.text
    assert (r.json()["parameters"]["sampler"], r.json()["parameters"]["schedule"]) == (
        "euler_ancestral",
        "exponential",
    )


def test_the_service_serves_traced_unets_unless_jit_is_off(make_client: Callable[..., TestClient]) -> None:
    for jit in (True, False):
        with make_client(jit=jit) as client:
            model = client.app.state.service.pool.models["tiny"]  # type: ignore[attr-defined]
            assert isinstance(model.denoiser.inner_model, TracedModule) is jit
            r = client.post("/sample", json={"model": "tiny", "steps": 3, "seed": 1, "class_label": 2})
            assert r.status_code == 200, r.text


def test_custom_sigmas_sample_like_the_schedule_they_copy(client: TestClient) -> None:
    """`sigmas` (ComfyUI's custom sigmas) gives the image of a named schedule with the same sigmas,
    is listed under /schedules as 'custom', and is recorded in the PNG for reproduction."""
    from service.sampling.schedules import get_sigmas_karras

    sigmas = get_sigmas_karras(6, 0.02, 20.0).tolist()  # the tiny model's range, as the schedule uses it
    base = {"class_label": 5, "seed": 3, "sampler": "dpmpp_2m"}
    named = client.post("/sample", json={**base, "schedule": "karras", "steps": 6}).json()
    custom = client.post("/sample", json={**base, "sigmas": sigmas[:-1]}).json()  # the final 0 is added
    assert custom["parameters"]["schedule"] == "custom" and custom["parameters"]["steps"] == 6
    assert _pixels(_png(custom["images"][0])) == _pixels(_png(named["images"][0]))
    params = read_parameters(_png(custom["images"][0]))
    again = client.post(
        "/sample", json={k: params[k] for k in ("sampler", "schedule", "sigmas", "seed", "class_label")}
    )
    assert _pixels(_png(again.json()["images"][0])) == _pixels(_png(custom["images"][0]))
    shorter = client.post("/sample", json={**base, "sigmas": sigmas[2:]}).json()  # starts lower: 4 steps
    assert shorter["parameters"]["steps"] == 4
    assert "custom" in {s["name"] for s in client.get("/schedules").json()["schedules"]}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_sampling_is_like_float32(make_client: Callable[..., TestClient], dtype: str) -> None:
    """KDIFF_DTYPE casts the weights; the sampler state stays float32, so the image stays close."""
    body = {"model": "tiny", "steps": 8, "seed": 4, "class_label": 1, "n": 2, "sampler": "dpmpp_2m"}
    images = {}
    for dt in ("float32", dtype):
        with make_client(dtype=dt) as client:
            model = client.app.state.service.pool.models["tiny"]  # type: ignore[attr-defined]
            assert next(model.denoiser.parameters()).dtype == getattr(torch, dt)
            r = client.post("/sample", json=body)
            assert r.status_code == 200, r.text
            images[dt] = [np.asarray(Image.open(io.BytesIO(_png(b64))), float) for b64 in r.json()["images"]]
    diff = max(np.abs(a - b).mean() for a, b in zip(images["float32"], images[dtype], strict=True))
    assert diff < 2.0, diff  # mean over pixels, on a 0-255 scale (measured: 0.14 bf16, 0.02 fp16)


def test_sigma_range_options_sample_like_the_same_custom_sigmas(client: TestClient) -> None:
    """sigma_min / sigma_max (top level or in schedule_options) narrow the schedule's range."""
    from service.sampling.schedules import get_sigmas_karras

    base = {"class_label": 2, "seed": 5, "sampler": "euler", "steps": 5}
    ranged = client.post("/sample", json={**base, "schedule": "karras", "sigma_min": 0.5, "sigma_max": 8.0})
    assert ranged.status_code == 200, ranged.text
    assert ranged.json()["parameters"]["schedule_options"] == {"sigma_min": 0.5, "sigma_max": 8.0}
    nested = client.post("/sample", json={**base, "schedule_options": {"sigma_min": 0.5, "sigma_max": 8.0}})
    custom = client.post(
        "/sample",
        json={
            **{k: v for k, v in base.items() if k != "steps"},
            "sigmas": get_sigmas_karras(5, 0.5, 8.0).tolist(),
        },
    )
    want = _pixels(_png(custom.json()["images"][0]))
    assert _pixels(_png(ranged.json()["images"][0])) == want == _pixels(_png(nested.json()["images"][0]))
    default = client.post("/sample", json={**base, "schedule": "karras"}).json()
    assert _pixels(_png(default["images"][0])) != want
    r = client.post("/sample", json={**base, "sigma_min": 30.0})  # above the tiny model's sigma_max of 20
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "sigma_min"], r.text


def test_guidance_rescale_is_a_request_field(client: TestClient) -> None:
    body = {"class_label": 3, "cfg_scale": 3.0, "steps": 4, "seed": 5}
    plain = client.post("/sample", json=body).json()
    rescaled = client.post("/sample", json={**body, "guidance_rescale": 0.7}).json()
    assert rescaled["parameters"]["guidance_rescale"] == 0.7
    assert rescaled["images"] != plain["images"]
    r = client.post("/sample", json={**body, "guidance_rescale": 1.5})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "guidance_rescale"]

"""The proof that a conditioning field is one field: SDXL's ``crops_coords_top_left``
(micro-conditioning) was added in three source files (serving/request.py: the field; api/schemas.py:
its line; models/stable_diffusion.py: its use) and reaches POST /sample, the A1111 and OpenAI routes
and the PNG parameters with no more edits. Its time ids match diffusers' own."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")

from diffusers import StableDiffusionXLPipeline  # noqa: E402

from service.images import read_parameters  # noqa: E402
from service.models.store import ModelStore  # noqa: E402
from service.serving.request import GenerationRequest  # noqa: E402
from tests.support.sd_tiny import tiny_sd_store  # noqa: E402

CROP = [16, 8]
BASE = {"model": "sdxl", "prompt": "a red cat", "steps": 2, "seed": 3, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    from service.api.app import create_app
    from service.api.settings import Settings

    settings = Settings(model_store=tiny_sd_store(), models=["sdxl", "sd1"], torch_threads=1, batch_wait_ms=0)
    with TestClient(create_app(settings)) as c:
        yield c


def test_time_ids_match_diffusers() -> None:
    """diffusers' SDXL pipeline builds add_time_ids = original_size + crops_coords_top_left +
    target_size; ours, for the same request, are the same numbers on cond and uncond rows."""
    sd = ModelStore(tiny_sd_store()).load("sdxl").text_model  # type: ignore[attr-defined]
    want = StableDiffusionXLPipeline._get_add_time_ids(
        _Shim(sd), (64, 64), tuple(CROP), (64, 64), torch.float32, _Shim(sd).projection_dim
    )
    inp = sd.job_inputs(
        "a red cat",
        None,
        n=2,
        cfg_scale=5.0,
        width=64,
        height=64,
        fields=GenerationRequest(crops_coords_top_left=CROP),
    )
    assert inp.uncond is not None
    for rows in (inp.cond, inp.uncond):
        assert torch.equal(rows["time_ids"], want.expand(2, -1))
    plain = sd.job_inputs("a red cat", None, n=1, cfg_scale=5.0, width=64, height=64)
    assert plain.cond["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]]


class _Shim:
    """What diffusers' ``_get_add_time_ids`` reads of the pipeline: the UNet's config."""

    def __init__(self, sd: Any) -> None:
        self.unet = sd.components.unet
        self.projection_dim = int(sd.components.text_encoders[1].config.projection_dim)


def _images(r: Any) -> list[str]:
    assert r.status_code == 200, r.text
    return r.json()["images"] if "images" in r.json() else [d["b64_json"] for d in r.json()["data"]]


def test_sample_records_and_uses_the_field(client: TestClient) -> None:
    with_crop = client.post("/sample", json={**BASE, "crops_coords_top_left": CROP})
    plain = client.post("/sample", json=BASE)
    assert with_crop.json()["parameters"]["crops_coords_top_left"] == CROP
    assert "crops_coords_top_left" not in plain.json()["parameters"]
    png = base64.b64decode(_images(with_crop)[0])
    assert read_parameters(png)["crops_coords_top_left"] == CROP
    assert _images(with_crop) != _images(plain)  # the UNet saw other time ids


def test_models_that_do_not_read_it_refuse_it(client: TestClient) -> None:
    r = client.post("/sample", json={**BASE, "model": "sd1", "crops_coords_top_left": CROP})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "crops_coords_top_left"]
    r = client.post("/sample", json={**BASE, "crops_coords_top_left": [1, 2, 3]})
    assert r.status_code == 422 and "crops_coords_top_left" in r.text


def test_a1111_and_openai_routes_carry_it(client: TestClient) -> None:
    a1111 = {"prompt": "a red cat", "steps": 2, "seed": 3, "width": 64, "height": 64, "cfg_scale": 5}
    a1111["override_settings"] = {"sd_model_checkpoint": "sdxl"}
    r = client.post("/sdapi/v1/txt2img", json={**a1111, "crops_coords_top_left": CROP})
    assert read_parameters(base64.b64decode(_images(r)[0]))["crops_coords_top_left"] == CROP
    plain = client.post("/sdapi/v1/txt2img", json=a1111)
    assert _images(r) != _images(plain)
    openai = {"model": "sdxl", "prompt": "a red cat", "size": "64x64", "steps": 2, "seed": 3}
    r = client.post("/v1/images/generations", json={**openai, "crops_coords_top_left": CROP})
    assert read_parameters(base64.b64decode(_images(r)[0]))["crops_coords_top_left"] == CROP

"""IP-Adapter workflows over ComfyUI's HTTP routes, as a client drives them: the reference image
uploaded (POST /upload/image), the workflow queued (POST /prompt), the image read back
(/history, /view); equal to POST /sample with the same ``ip_adapters`` unit (the image as base64),
on SD 1.x (IPAdapterModelLoader + CLIPVisionLoader + IPAdapterAdvanced) and SDXL (the unified
loader's PLUS preset picking the SDXL file); a file not in the store is POST /prompt's 400 with
ComfyUI's node_errors; /object_info and /models list the files."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")

from tests.support.ipadapter_tiny import ip_store  # noqa: E402

from .conftest import pixels  # noqa: E402
from .test_ipadapter_nodes import VIT_H, advanced, png_bytes, reference, unified, workflow  # noqa: E402


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    from service.api.app import create_app
    from service.api.settings import Settings

    settings = Settings(model_store=ip_store()[0], torch_threads=1, batch_wait_ms=0, models=["sd1"])
    with TestClient(create_app(settings)) as c:
        yield c


def queue(client: TestClient, wf: dict[str, Any]) -> np.ndarray:
    r = client.post("/prompt", json={"prompt": wf, "client_id": "ipadapter-test"})
    assert r.status_code == 200, r.text
    prompt_id = r.json()["prompt_id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        item = client.get(f"/history/{prompt_id}").json().get(prompt_id)
        if item is not None:
            assert item["status"]["status_str"] == "success", item["status"]
            (image,) = item["outputs"]["9"]["images"]
            return pixels(client.get("/view", params=image).content)
        time.sleep(0.05)
    raise AssertionError("the prompt never finished")


def sample(client: TestClient, model: str, size: int, *units: dict[str, Any]) -> np.ndarray:
    body = {"model": model, "prompt": "a red cat", "negative_prompt": "the dog", "cfg_scale": 5.0}
    body |= {"sampler": "euler", "schedule": "karras", "steps": 4, "seed": 9, "width": size, "height": size}
    r = client.post("/sample", json=body | {"ip_adapters": list(units)})
    assert r.status_code == 200, r.text
    return pixels(base64.b64decode(r.json()["images"][0]))


def test_ipadapter_workflows_over_http_equal_sample(client: TestClient) -> None:
    up = client.post("/upload/image", files={"image": ("face.png", png_bytes(reference(1)), "image/png")})
    assert up.status_code == 200 and up.json()["name"] == "face.png"
    b64 = base64.b64encode(png_bytes(reference(1))).decode()

    info = client.get("/object_info/IPAdapterModelLoader").json()["IPAdapterModelLoader"]
    assert "ip-adapter-plus_sd15.bin" in info["input"]["required"]["ipadapter_file"][0]
    assert VIT_H in client.get("/models/clip_vision").json()
    assert "sdxl_models/ip-adapter_sdxl.safetensors" in client.get("/models/ipadapter").json()

    wf = workflow(
        advanced(("20", "21", "22", "23"), "ip-adapter-plus_sd15.bin", VIT_H, "face.png", end_at=0.5)
    )
    unit = {"model": "ip-adapter-plus_sd15", "image": b64, "weight": 0.8, "guidance_end": 0.5}
    assert np.array_equal(queue(client, wf), sample(client, "sd1", 32, unit))

    # SDXL: the PLUS preset is the SDXL file (ip-adapter-plus_sdxl_vit-h), on the ViT-H encoder
    wf = workflow(unified("PLUS (high strength)", "face.png"))
    wf["4"]["inputs"]["ckpt_name"] = "sdxl.safetensors"
    wf["5"]["inputs"].update(width=64, height=64)
    unit = {"model": "ip-adapter-plus_sdxl_vit-h", "image": b64, "weight": 0.8}
    assert np.array_equal(queue(client, wf), sample(client, "sdxl", 64, unit))

    # a file this store does not have: POST /prompt's 400, ComfyUI's node_errors
    wf = workflow(advanced(("20", "21", "22", "23"), "ip-adapter_sd15_light_v11.bin", VIT_H, "face.png"))
    r = client.post("/prompt", json={"prompt": wf})
    assert r.status_code == 400
    body = r.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    (err,) = body["node_errors"]["20"]["errors"]
    assert body["node_errors"]["20"]["class_type"] == "IPAdapterModelLoader"
    assert err["type"] == "value_not_in_list" and err["extra_info"]["input_name"] == "ipadapter_file"

"""PNG metadata: A1111's infotext in the ``parameters`` chunk, our JSON in ``kdiff``; both read back
by /sdapi/v1/png-info, and either reproduces the image."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service import infotext
from service.images import read_parameters
from tests.support.compat import pixels


@pytest.fixture(scope="module")
def api(make_client: Callable[..., TestClient]) -> Iterator[TestClient]:
    with make_client() as c:
        yield c


def test_infotext_format_and_parse_round_trip() -> None:
    p = {
        "prompt": "a cat, sitting\non a mat",
        "negative_prompt": "dog",
        "steps": 20,
        "sampler": "dpmpp_2m",
        "schedule": "karras",
        "cfg_scale": 7.0,
        "seed": 1,
        "width": 512,
        "height": 512,
        "model": "sd1",
        "clip_skip": 2,
        "img2img": True,
        "denoise": 0.5,
    }
    text = infotext.from_parameters(p)
    assert text.startswith("a cat, sitting\non a mat\nNegative prompt: dog\n")
    assert "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512" in text
    back = infotext.parse(text)
    assert back["Prompt"] == "a cat, sitting\non a mat" and back["Negative prompt"] == "dog"
    assert back["Clip skip"] == "2" and back["Denoising strength"] == "0.5" and back["Model"] == "sd1"


def test_sample_png_chunks_and_reproduction_from_each(api: TestClient) -> None:
    body = {"class_label": 4, "steps": 3, "sampler": "euler", "schedule": "karras", "seed": 17}
    png_b64 = api.post("/sample", json=body).json()["images"][0]
    img = Image.open(io.BytesIO(base64.b64decode(png_b64)))
    assert img.info["parameters"].startswith("4\nSteps: 3, Sampler: Euler, Schedule type: Karras")
    ours = read_parameters(base64.b64decode(png_b64))
    assert ours["class_label"] == 4 and ours["seed"] == 17
    info = api.post("/sdapi/v1/png-info", json={"image": png_b64}).json()
    assert info["items"]["kdiff"] and info["parameters"]["Seed"] == "17"
    # our JSON -> /sample
    again = {k: ours[k] for k in ("class_label", "steps", "sampler", "schedule", "seed", "cfg_scale")}
    same = api.post("/sample", json=again).json()["images"][0]
    # A1111's infotext -> /sdapi/v1/txt2img
    p = info["parameters"]
    a1111 = {
        "prompt": p["Prompt"],
        "steps": int(p["Steps"]),
        "sampler_name": p["Sampler"],
        "scheduler": p["Schedule type"],
        "cfg_scale": float(p["CFG scale"]),
        "seed": int(p["Seed"]),
        "width": int(p["Size-1"]),
        "height": int(p["Size-2"]),
    }
    via_a1111 = api.post("/sdapi/v1/txt2img", json=a1111).json()["images"][0]
    want = pixels(png_b64)
    assert np.array_equal(pixels(same), want) and np.array_equal(pixels(via_a1111), want)

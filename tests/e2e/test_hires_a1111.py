"""Hires fix through A1111's API with the real ``webuiapi`` client against `kdiff serve` (a tiny SD 1.x
model, random weights; the shipped digits model): the image has the hires size, the infotext (in
``info`` and in the PNG's ``parameters`` chunk) has A1111's ``Hires ...`` fields and the first pass's
``Size``; ``/sdapi/v1/progress`` counts the two passes as A1111 does (``job_count`` 2, ``job_no`` 1
and ``sampling_step`` restarting in the second); bad hires fields are 422s naming the field."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import webuiapi

from tests.support.compat import pixels
from tests.support.sd_tiny import frontend_server
from tests.support.server import Server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with frontend_server(tmp_path_factory, KDIFF_MAX_STEPS="10000", KDIFF_DEFAULT_MODEL="sd1") as srv:
        yield srv


def _api(server: Server, steps: int = 3) -> Any:
    return webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1", sampler="Euler a", steps=steps)


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (nearest)", "Lanczos", "Nearest"])
def test_webuiapi_hires_fix_returns_the_hires_size_with_both_passes_infotext(
    server: Server, upscaler: str
) -> None:
    result = _api(server).txt2img(
        prompt="a red cat", negative_prompt="the dog", seed=5, width=64, height=64, cfg_scale=5,
        enable_hr=True, hr_scale=2, hr_upscaler=upscaler, hr_second_pass_steps=2, denoising_strength=0.6,
    )  # fmt: skip
    assert [im.size for im in result.images] == [(128, 128)]
    text = result.info["infotexts"][0]
    for field in ("Steps: 3", "Size: 64x64", "Denoising strength: 0.6", "Hires upscale: 2", "Hires steps: 2",
                  f"Hires upscaler: {upscaler}"):  # fmt: skip
        assert field in text, text
    assert result.images[0].info["parameters"] == text  # the PNG's parameters chunk
    assert result.info["width"] == 64 and result.info["denoising_strength"] == 0.6
    assert result.info["extra_generation_params"]["Hires upscaler"] == upscaler
    assert not any("hires" in c for c in result.info["comments"]), result.info["comments"]


def test_hires_resize_both_sides_crops_to_that_size(server: Server) -> None:
    result = _api(server).txt2img(
        prompt="a cat", seed=1, width=64, height=32, enable_hr=True, hr_resize_x=96, hr_resize_y=96,
        hr_upscaler="Latent (bicubic)", denoising_strength=0.5, hr_sampler_name="DPM++ 2M",
        hr_prompt="a dog", hr_checkpoint_name="sd1.safetensors [0123abcd]",  # the same model, A1111's title
    )  # fmt: skip
    assert result.images[0].size == (96, 96)
    text = result.info["infotexts"][0]
    for field in ("Hires resize: 96x96", "Hires sampler: DPM++ 2M", "Hires prompt: a dog"):
        assert field in text, text


def test_progress_counts_both_passes_as_a1111(server: Server) -> None:
    api, other = _api(server, steps=40), _api(server)
    out: dict[str, Any] = {}

    def generate() -> None:
        hires = {"enable_hr": True, "hr_scale": 2, "hr_second_pass_steps": 5000, "denoising_strength": 0.5}
        out["result"] = api.txt2img(prompt="a cat", seed=3, width=64, height=64, **hires)

    t = threading.Thread(target=generate)
    t.start()
    seen: list[tuple[int, int, int, int]] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            s = other.get_progress()["state"]
            if s["job_count"]:
                seen.append((s["job_count"], s["job_no"], s["sampling_step"], s["sampling_steps"]))
                if s["job_no"] == 1 and s["sampling_step"] >= 2:
                    break
            time.sleep(0.02)
        other.interrupt()  # the second pass would run 5000 steps
        t.join(120)
    finally:
        other.interrupt()
    assert all(c == 2 for c, _, _, _ in seen), seen
    first = [x for x in seen if x[1] == 0]
    second = [x for x in seen if x[1] == 1]
    assert first and all(total == 40 for _, _, _, total in first), seen
    assert second and all(total == 5000 and step < 5000 for _, _, step, total in second), seen
    result = out["result"]
    assert result.info["interrupted"] and result.images[0].size == (128, 128)


def test_bad_hires_fields_are_422s_naming_the_field(server: Server) -> None:
    base = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "enable_hr": True}
    bad = [
        ({"hr_upscaler": "4x-Nothing"}, "hr_upscaler", "Latent (nearest-exact)"),
        ({"hr_scale": 3}, "hr_scale", "128"),  # 192 > the tiny model's max_size 128
        ({"hr_resize_x": 4096}, "hr_resize_x", "128"),
        ({"hr_sampler_name": "Nope"}, "hr_sampler_name", "Euler"),
        ({"hr_scale": float("nan")}, "hr_scale", ""),
        # a second-pass checkpoint: refused (the second pass continues on the first pass's model)
        ({"hr_checkpoint_name": "digits"}, "hr_checkpoint_name", "Use same checkpoint"),
    ]
    for extra, field, listed in bad:
        body = {**base, **extra}
        # json.dumps writes NaN as Python's parser reads it
        r = httpx.post(f"{server.url}/sdapi/v1/txt2img", content=json.dumps(body),
                       headers={"Content-Type": "application/json"}, timeout=60)  # fmt: skip
        assert r.status_code == 422, (extra, r.text)
        assert field in r.text and listed in r.text, (extra, r.text)
    r = httpx.post(f"{server.url}/sample", json={"model": "sd1", "prompt": "x", "steps": 1,
                                                 "hires": {"upscaler": "Bogus"}}, timeout=60)  # fmt: skip
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert (
        detail["loc"] == ["body", "hires"]
        and "Latent (antialiased)" in detail["msg"]
        and "Lanczos" in detail["msg"]
    )
    r = httpx.post(f"{server.url}/sample", json={"model": "digits", "class_label": 1, "steps": 1,
                                                 "hires": {"scale": 2}}, timeout=60)  # fmt: skip
    assert r.status_code == 422 and "hires" in r.text, r.text


def test_a_fixed_size_model_resizes_to_the_hires_size_and_says_so(server: Server) -> None:
    body = {"prompt": "the digit 3", "steps": 2, "width": 64, "height": 64, "enable_hr": True,
            "override_settings": {"sd_model_checkpoint": "digits"}}  # fmt: skip
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=60)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert any("hires fix not run" in c for c in info["comments"]), info["comments"]
    assert pixels(r.json()["images"][0]).shape[:2] == (128, 128)

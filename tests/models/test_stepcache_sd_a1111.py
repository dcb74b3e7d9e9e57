"""The sd-webui DeepCache extension's level and hires options on the A1111 route (tiny random SD 1.x):
sent as the extension's settings page stores them (scripts/deepcache_script.py's on_ui_settings:
``deepcache_cache_resnet_level`` a 0-10 slider, default 0; ``deepcache_hr_reuse`` a checkbox),
through ``POST /sdapi/v1/options`` and in ``override_settings``."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")

from service.images import read_parameters  # noqa: E402
from tests.support.app_client import app_client  # noqa: E402
from tests.support.sd_tiny import save_diffusers, write_manifest  # noqa: E402

LEVEL, REUSE = "deepcache_cache_resnet_level", "deepcache_hr_reuse"
# every option of the extension's settings section, as its UI stores them (its defaults but the switch)
UI = {
    "deepcache_enable_pass": "both passes",
    LEVEL: 0,
    "deepcache_cache_enable_step_percentage": 0.4,
    "deepcache_full_run_step_rate": 2,
    REUSE: False,
    "deepcache_cache_enable_step_percentage_hr": 0.0,
}
TXT = {"prompt": "a red cat", "steps": 5, "sampler_name": "Euler", "seed": 3, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("dc-a1111")
    save_diffusers(root / "sd1")
    write_manifest(root / "sd1")
    with app_client(root, batch_wait_ms=0) as c:
        yield c


def _pixels(data: str) -> bytes:
    """The image's pixels (the PNGs' text chunks differ between routes and settings)."""
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB").tobytes()


def _txt2img(client: TestClient, **body: Any) -> tuple[bytes, dict[str, Any]]:
    r = client.post("/sdapi/v1/txt2img", json={**TXT, **body})
    assert r.status_code == 200, r.text
    image = r.json()["images"][0]
    return _pixels(image), read_parameters(base64.b64decode(image))


def _image(r: Any) -> bytes:
    assert r.status_code == 200, r.text
    return _pixels(r.json()["images"][0])


def test_the_level_from_the_settings_page_and_override_settings(client: TestClient) -> None:
    """The stored settings with level 3: recorded, and our ``cache`` with those values gives the same
    image; levels change the image; 10 (the slider's end) is this UNet's last skip (3), as the
    extension clamps it; override_settings wins over the stored value."""
    r = client.post("/sdapi/v1/options", json={**UI, LEVEL: 3})
    assert r.status_code == 200, r.text
    try:
        three, params = _txt2img(client)
        assert params["cache"] == {"method": "deepcache", "interval": 2, "start": 2, "level": 3}
        body = {"prompt": "a red cat", "steps": 5, "sampler": "euler", "seed": 3, "width": 64, "height": 64}
        again = client.post(
            "/sample", json={**body, "cache": params["cache"], "cfg_scale": params["cfg_scale"]}
        )
        assert _image(again) == three
        ten, _ = _txt2img(client, override_settings={LEVEL: 10.0})  # a slider's value as a float
        zero, params = _txt2img(client, override_settings={LEVEL: 0})
        assert params["cache"]["level"] == 0
        assert ten == three and zero != three
    finally:
        client.post("/sdapi/v1/options", json={"deepcache_enable_pass": "disable", LEVEL: 0})


@pytest.mark.parametrize("level", [11, -1, 2.5, "1", True])
def test_a_level_off_the_slider_is_422_naming_it(client: TestClient, level: Any) -> None:
    over = {**UI, LEVEL: level}
    r = client.post("/sdapi/v1/txt2img", json={**TXT, "override_settings": over})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["loc"][-1] == f"override_settings.{LEVEL}", detail
    assert "[0, 10]" in detail["msg"]


def test_hr_reuse_with_a_hires_fix_is_422(client: TestClient) -> None:
    """The extension's second pass reads the first pass's cached features; ours runs at the new size
    from a full evaluation: refused naming the option (override_settings or the stored setting);
    without a hires fix there is no second pass and it changes nothing."""
    hires = {"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "denoising_strength": 0.5}
    r = client.post("/sdapi/v1/txt2img", json={**TXT, **hires, "override_settings": {**UI, REUSE: True}})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][-1] == f"override_settings.{REUSE}"
    assert "not supported" in r.json()["detail"][0]["msg"]
    assert client.post("/sdapi/v1/options", json={**UI, REUSE: True}).status_code == 200
    try:
        r = client.post("/sdapi/v1/txt2img", json={**TXT, **hires})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == REUSE, r.text
        with_reuse, _ = _txt2img(client)
        without, _ = _txt2img(client, override_settings={REUSE: False})
        assert with_reuse == without
    finally:
        client.post("/sdapi/v1/options", json={"deepcache_enable_pass": "disable", REUSE: False})

"""SwinIR and HAT files through the A1111 routes, as a user drops them into model_store/upscalers/:
listed by /sdapi/v1/upscalers with their family and scale, /sdapi/v1/extra-single-image equal to
spandrel on the same file (8-bit PNG rounding apart), and as txt2img's hires-fix ``hr_upscaler`` (the
image has the hires size and the infotext names the upscaler)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.settings import Settings
from tests.support import upscaler_files as uf
from tests.support import upscaler_files_swin as us
from tests.support.compat import pixels, png_b64
from tests.support.hostile_images import noisy
from tests.support.sd_tiny import tiny_sd_store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    (root / "sd1").symlink_to(tiny_sd_store() / "sd1", target_is_directory=True)  # built once per run
    uf.write(root / "upscalers" / "HAT-S_SRx4.pth", us.hat(us.Dims(24, heads=2), cab=(24, 24)), "params_ema")
    uf.write(root / "upscalers" / "SwinIR_x2.safetensors", us.swinir(scale=2))
    return root


@pytest.fixture(scope="module")
def client(store: Path) -> Iterator[TestClient]:
    settings = Settings(model_store=store, torch_threads=1, upscaler_tile=0, default_model="sd1")
    with TestClient(create_app(settings)) as c:
        yield c


def test_listed_with_family_and_scale(client: TestClient, store: Path) -> None:
    by = {i["name"]: i for i in client.get("/sdapi/v1/upscalers").json()}
    assert (by["HAT-S_SRx4"]["model_name"], by["HAT-S_SRx4"]["scale"]) == ("HAT", 4)
    assert (by["SwinIR_x2"]["model_name"], by["SwinIR_x2"]["scale"]) == ("SwinIR", 2)
    assert by["SwinIR_x2"]["model_path"] == str(store / "upscalers" / "SwinIR_x2.safetensors")


def test_extras_equal_spandrel(client: TestClient, store: Path) -> None:
    img = noisy((20, 26), seed=2)  # 20 x 26: not a multiple of the window; x4 a multiple of 8
    r = client.post(
        "/sdapi/v1/extra-single-image",
        json={"image": png_b64(np.asarray(img)), "upscaler_1": "HAT-S_SRx4", "upscaling_resize": 4},
    )
    assert r.status_code == 200, r.text
    run, _, _ = uf.spandrel_model(store / "upscalers" / "HAT-S_SRx4.pth")
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    want = np.round(run(x).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).astype(np.int16)
    out = pixels(r.json()["image"])
    assert out.shape == want.shape == (104, 80, 3)
    assert np.abs(out - want).max() <= 1  # the same float image, rounded to 8 bits
    assert want.std() > 10  # not a flat image


def test_hires_fix_with_a_swinir_upscaler(client: TestClient) -> None:
    r = client.post(
        "/sdapi/v1/txt2img",
        json={
            "prompt": "a red cat", "seed": 5, "steps": 2, "width": 64, "height": 64, "enable_hr": True,
            "hr_scale": 2, "hr_upscaler": "SwinIR_x2", "hr_second_pass_steps": 1, "denoising_strength": 0.5,
        },
    )  # fmt: skip
    assert r.status_code == 200, r.text
    assert pixels(r.json()["images"][0]).shape == (128, 128, 3)
    info = r.json()["info"]
    assert "Hires upscaler: SwinIR_x2" in info and "Hires upscale: 2" in info

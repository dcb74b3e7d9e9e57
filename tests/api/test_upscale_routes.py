"""The upscaling routes over HTTP: A1111's listings and extras routes (its field semantics and error
shape), our GET /upscalers and POST /upscale; results against spandrel on the same file; bombs refused by
the image gate before a pixel is decoded; a corrupt upscaler file fails only its own requests."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service.api.app import create_app
from service.api.settings import Settings
from tests.support import upscaler_files as uf
from tests.support.hostile_images import b64, bomb_png, jpeg_claiming, noisy
from tests.support.tiny_store import make_tiny_store

LATENT = [
    "Latent",
    "Latent (antialiased)",
    "Latent (bicubic)",
    "Latent (bicubic antialiased)",
    "Latent (nearest)",
    "Latent (nearest-exact)",
]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_tiny_store(tmp_path_factory.mktemp("store"))
    uf.write(root / "upscalers" / "realesr-general-x4v3.pth", uf.compact(num_conv=4, nf=16), "params")
    uf.write(root / "upscalers" / "4x-small.safetensors", uf.esrgan_old(nb=1, nf=8, gc=4))
    (root / "upscalers" / "corrupt.pth").write_bytes(b"PK\x03\x04 not really a zip")
    return root


@pytest.fixture(scope="module")
def client(store: Path) -> Iterator[TestClient]:
    settings = Settings(model_store=store, torch_threads=1, upscaler_tile=24, upscaler_tile_overlap=8)
    with TestClient(create_app(settings)) as c:
        yield c


def _png(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _img(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def _spandrel_uint8(path: Path, img: Image.Image) -> np.ndarray:
    run, _, _ = uf.spandrel_model(path)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    y = run(x).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    return np.round(y * 255).astype(np.int16)


def test_listings(client: TestClient, store: Path) -> None:
    items = client.get("/sdapi/v1/upscalers").json()
    assert [i["name"] for i in items] == [
        "None",
        "Lanczos",
        "Nearest",
        "4x-small",
        "corrupt",
        "realesr-general-x4v3",
    ]
    assert set(items[0]) == {"name", "model_name", "model_path", "model_url", "scale"}
    by = {i["name"]: i for i in items}
    assert (
        by["realesr-general-x4v3"]["model_name"] == "RealESRGAN" and by["realesr-general-x4v3"]["scale"] == 4
    )
    assert by["4x-small"]["model_path"] == str(store / "upscalers" / "4x-small.safetensors")
    assert client.get("/sdapi/v1/latent-upscale-modes").json() == [{"name": n} for n in LATENT]
    ours = client.get("/upscalers").json()
    assert [u["name"] for u in ours["upscalers"]] == [i["name"] for i in items]
    assert ours["latent_upscale_modes"] == LATENT


def test_extra_single_image_equals_spandrel(client: TestClient, store: Path) -> None:
    img = noisy((40, 48), seed=3)  # 40x48 -> 4x: 160x192, three tiles per axis at tile 24
    r = client.post(
        "/sdapi/v1/extra-single-image",
        json={"image": _png(img), "upscaler_1": "realesr-general-x4v3", "upscaling_resize": 4},
    )
    assert r.status_code == 200, r.text
    out = np.asarray(_img(r.json()["image"]), dtype=np.int16)
    want = _spandrel_uint8(store / "upscalers" / "realesr-general-x4v3.pth", img)
    assert out.shape == want.shape == (192, 160, 3)
    # tiles of 24 px with 8 px of context vs spandrel's whole image: within a couple of 8-bit levels
    assert np.abs(out - want).max() <= 2 and np.abs(out - want).mean() < 0.05
    assert (
        r.json()["html_info"]
        == "<p>Postprocess upscale by: 4.0, Postprocess upscaler: realesr-general-x4v3</p>"
    )


def test_extras_resize_mode_crop_blend_and_batch(client: TestClient) -> None:
    img = noisy((30, 20), seed=4)
    base = {"resize_mode": 1, "upscaling_resize_w": 64, "upscaling_resize_h": 64, "upscaler_1": "4x-small"}
    one = client.post("/sdapi/v1/extra-single-image", json={**base, "image": _png(img)}).json()
    # factor max(64/30, 64/20) = 3.2 -> int(30*3.2//8*8) x int(20*3.2//8*8) = 96x64, centred on 64x64
    assert _img(one["image"]).size == (64, 64)
    assert "Postprocess upscale to: 64x64, Postprocess crop to: 64x64" in one["html_info"]
    uncropped = client.post(
        "/sdapi/v1/extra-single-image", json={**base, "image": _png(img), "upscaling_crop": False}
    ).json()
    assert _img(uncropped["image"]).size == (96, 64)
    assert np.array_equal(np.asarray(_img(one["image"])), np.asarray(_img(uncropped["image"]))[:, 16:80])
    nearest = client.post(
        "/sdapi/v1/extra-single-image", json={**base, "image": _png(img), "upscaler_1": "Nearest"}
    ).json()
    blend = {**base, "upscaler_2": "Nearest", "extras_upscaler_2_visibility": 0.3}
    both = client.post("/sdapi/v1/extra-single-image", json={**blend, "image": _png(img)}).json()
    want = Image.blend(_img(one["image"]), _img(nearest["image"]), 0.3)
    assert np.array_equal(np.asarray(_img(both["image"])), np.asarray(want))
    assert both["html_info"].endswith("Postprocess upscaler: 4x-small, Postprocess upscaler 2: Nearest</p>")
    batch = client.post(
        "/sdapi/v1/extra-batch-images",
        json={**blend, "imageList": [{"data": _png(img), "name": "a"}, {"data": _png(img), "name": "b"}]},
    ).json()
    assert [np.array_equal(np.asarray(_img(i)), np.asarray(want)) for i in batch["images"]] == [True, True]
    same = client.post("/sdapi/v1/extra-single-image", json={"image": _png(img)}).json()  # upscaler_1 None
    assert np.array_equal(np.asarray(_img(same["image"])), np.asarray(img))


def test_unknown_and_corrupt_upscalers(client: TestClient) -> None:
    img = _png(noisy((16, 16)))
    r = client.post("/sdapi/v1/extra-single-image", json={"image": img, "upscaler_1": "R-ESRGAN 4x+"})
    assert r.status_code == 422
    body = r.json()
    assert body["error"] == "FieldError" and body["detail"][0]["loc"] == ["body", "upscaler_1"]
    assert body["detail"][0]["allowed"] == [i["name"] for i in client.get("/sdapi/v1/upscalers").json()]
    r = client.post("/upscale", json={"image": img, "upscaler": "nope"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "upscaler"]
    assert "realesr-general-x4v3" in r.json()["detail"][0]["allowed"]
    for _ in range(2):
        r = client.post("/sdapi/v1/extra-single-image", json={"image": img, "upscaler_1": "corrupt"})
        assert r.status_code == 422 and "'corrupt' (corrupt.pth) cannot be used" in r.json()["errors"]
        r = client.post("/upscale", json={"image": img, "upscaler": "corrupt", "scale": 2})
        assert r.status_code == 422 and "corrupt.pth" in r.json()["detail"][0]["msg"]
    r = client.post("/upscale", json={"image": img, "upscaler": "4x-small", "scale": 2})
    assert r.status_code == 200
    r = client.post("/sdapi/v1/extra-single-image", json={"image": img, "gfpgan_visibility": 0.5})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "gfpgan_visibility"]


def test_our_upscale_route(client: TestClient) -> None:
    img = _png(noisy((30, 20), seed=5))
    r = client.post("/upscale", json={"image": img, "upscaler": "4x-small", "width": 45})
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["width"], out["height"]) == (45, 30) and _img(out["image"]).size == (45, 30)
    assert client.post("/upscale", json={"image": img, "scale": 1.5}).json()["width"] == 45
    assert client.post("/upscale", json={"image": img, "scale": 2, "width": 9}).status_code == 422
    r = client.post("/upscale", json={"image": img, "upscaler": "Lanczos", "scale": 16})
    assert r.status_code == 200  # 480x320: within KDIFF_UPSCALE_MAX_PIXELS


@pytest.mark.parametrize(
    ("path", "body", "loc", "shape"),
    [
        ("/sdapi/v1/extra-single-image", lambda b: {"image": b, "upscaler_1": "4x-small"}, "image", "a1111"),
        (
            "/sdapi/v1/extra-batch-images",
            lambda b: {"imageList": [{"data": b, "name": "x"}]},
            "imageList.0.data",
            "a1111",
        ),
        ("/upscale", lambda b: {"image": b, "upscaler": "4x-small"}, "image", "ours"),
    ],
)
@pytest.mark.parametrize("bomb", [bomb_png(12000, 12000), jpeg_claiming(12000, 12000)], ids=["png", "jpeg"])
def test_bombs_are_refused_by_the_gate(
    client: TestClient, path: str, body, loc: str, shape: str, bomb: bytes
) -> None:  # type: ignore[no-untyped-def]
    r = client.post(path, json=body(b64(bomb)))
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["loc"] == ["body", loc] and "pixels" in detail["msg"]
    if shape == "a1111":
        assert r.json()["error"] == "FieldError"

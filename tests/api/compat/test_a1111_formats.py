"""A1111's image encoding (``modules/api/api.py`` ``encode_pil_to_base64``) and img2img's
``initial_noise_multiplier`` (``processing.py``: the unit noise times it, "Noise multiplier" in the
infotext), in-process on the tiny class-conditional model.

The EXIF UserComment is read here as A1111's reader does (``images.read_info_from_image``:
``piexif.helper.UserComment.load``): an 8-byte ``b"UNICODE\\0"`` prefix, then UTF-16 big-endian."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin

from service.api.compat.a1111_encode import Encoding, encode, user_comment
from tests.support.compat import info, pixels, png_b64

BASE = {"prompt": "a 7", "steps": 3, "sampler_name": "Euler", "seed": 11, "width": 16, "height": 16}


@pytest.fixture(scope="module")
def a1111(make_client: Callable[..., TestClient]) -> Iterator[TestClient]:
    with make_client() as c:
        yield c


def _key(n: int) -> dict[str, str]:
    """A caller of its own (options are per caller)."""
    return {"Authorization": "Basic " + base64.b64encode(f"fmt{n}:".encode()).decode()}


def _image(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))  # what webuiapi does with each image
    img.load()
    return img


def _user_comment(img: Image.Image) -> str:
    raw = img.getexif().get_ifd(0x8769)[0x9286]
    assert raw[:8] == b"UNICODE\x00", raw[:16]
    return raw[8:].decode("utf-16-be")


def _txt2img(client: TestClient, headers: dict[str, str], **extra: Any) -> dict[str, Any]:
    r = client.post("/sdapi/v1/txt2img", json={**BASE, **extra}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize(("fmt", "pil"), [("jpg", "JPEG"), ("JPEG", "JPEG"), ("webp", "WEBP")])
def test_samples_format_encodes_the_images_with_the_infotext_in_exif(
    a1111: TestClient, fmt: str, pil: str
) -> None:
    headers = _key(10 + ["jpg", "JPEG", "webp"].index(fmt))
    assert a1111.post("/sdapi/v1/options", json={"samples_format": fmt}, headers=headers).status_code == 200
    out = _txt2img(a1111, headers, batch_size=2)
    meta = info(out)
    for b64, text in zip(out["images"], meta["infotexts"], strict=True):
        img = _image(b64)
        assert img.format == pil and img.size == (16, 16) and img.mode == "RGB"
        assert _user_comment(img) == text and "Seed: " in text
    # /png-info reads it back, as A1111's does
    parsed = a1111.post("/sdapi/v1/png-info", json={"image": out["images"][1]}).json()
    assert parsed["info"] == meta["infotexts"][1] and parsed["parameters"]["Seed"] == "12"


def test_jpeg_quality_and_webp_lossless(a1111: TestClient) -> None:
    headers = _key(1)
    png = pixels(_txt2img(a1111, headers)["images"][0])
    sizes = []
    for quality in (5, 100):
        a1111.post(
            "/sdapi/v1/options", json={"samples_format": "jpg", "jpeg_quality": quality}, headers=headers
        )
        sizes.append(len(base64.b64decode(_txt2img(a1111, headers)["images"][0])))
    assert sizes[0] < sizes[1], sizes
    a1111.post("/sdapi/v1/options", json={"samples_format": "webp", "webp_lossless": True}, headers=headers)
    lossless = _image(_txt2img(a1111, headers)["images"][0])
    assert lossless.format == "WEBP" and np.array_equal(np.asarray(lossless.convert("RGB")), png)
    opts = a1111.get("/sdapi/v1/options", headers=headers).json()
    assert (opts["samples_format"], opts["jpeg_quality"], opts["webp_lossless"]) == ("webp", 100, True)


def test_override_samples_format_counts_only_when_not_restored(a1111: TestClient) -> None:
    """process_images restores the overridden options before the API encodes (restore_afterwards
    defaults to true): PNG then; with false the override stays set, and the images take it."""
    headers = _key(2)
    out = _txt2img(a1111, headers, override_settings={"samples_format": "jpg"})
    assert _image(out["images"][0]).format == "PNG"
    assert a1111.get("/sdapi/v1/options", headers=headers).json()["samples_format"] == "png"
    out = _txt2img(
        a1111,
        headers,
        override_settings={"samples_format": "webp"},
        override_settings_restore_afterwards=False,
    )
    assert _image(out["images"][0]).format == "WEBP"
    assert a1111.get("/sdapi/v1/options", headers=headers).json()["samples_format"] == "webp"
    assert _image(_txt2img(a1111, headers)["images"][0]).format == "WEBP"  # it stayed set


@pytest.mark.parametrize(
    ("where", "body"),
    [
        ("samples_format", {"samples_format": "gif"}),
        ("jpeg_quality", {"jpeg_quality": 0}),
        ("webp_lossless", {"webp_lossless": "yes"}),
        ("initial_noise_multiplier", {"initial_noise_multiplier": -1}),
    ],
)
def test_bad_format_options_are_422s_naming_the_option(a1111: TestClient, where: str, body: dict) -> None:
    r = a1111.post("/sdapi/v1/options", json=body, headers=_key(3))
    assert r.status_code == 422 and where in r.text, r.text
    r = a1111.post("/sdapi/v1/txt2img", json={**BASE, "override_settings": body}, headers=_key(3))
    assert r.status_code == 422 and f"override_settings.{where}" in r.text, r.text


def _img2img(client: TestClient, headers: dict[str, str], **extra: Any) -> dict[str, Any]:
    init = np.zeros((16, 16, 3), np.uint8)
    init[4:12, 6:10] = 255
    body = {**BASE, "init_images": [png_b64(init)], "denoising_strength": 0.6, **extra}
    r = client.post("/sdapi/v1/img2img", json=body, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def test_initial_noise_multiplier_scales_img2img_noise_and_is_in_the_infotext(a1111: TestClient) -> None:
    headers = _key(4)
    plain = _img2img(a1111, headers)
    assert "Noise multiplier" not in info(plain)["infotexts"][0]
    assert _img2img(a1111, headers, initial_noise_multiplier=1.0)["images"] == plain["images"]
    half = _img2img(a1111, headers, initial_noise_multiplier=0.5)
    meta = info(half)
    assert "Noise multiplier: 0.5" in meta["infotexts"][0]
    assert meta["extra_generation_params"]["Noise multiplier"] == 0.5
    assert not np.array_equal(pixels(half["images"][0]), pixels(plain["images"][0]))
    # the caller's option, and override_settings, give the same image as the field
    a1111.post("/sdapi/v1/options", json={"initial_noise_multiplier": 0.5}, headers=headers)
    assert _img2img(a1111, headers)["images"] == half["images"]
    a1111.post("/sdapi/v1/options", json={"initial_noise_multiplier": 1.0}, headers=headers)
    assert (
        _img2img(a1111, headers, override_settings={"initial_noise_multiplier": 0.5})["images"]
        == half["images"]
    )
    # our /sample: the same field by our name; without an init image it means nothing: a 422
    r = a1111.post("/sample", json={"model": "tiny", "class_label": 1, "steps": 2, "noise_multiplier": 0.5})
    assert r.status_code == 422 and "noise_multiplier" in r.text and "init_image" in r.text, r.text


# piexif 1.1.3's dump({"Exif": {UserComment: UserComment.dump("Steps: 3, ✓", encoding="unicode")}}),
# what A1111 writes into its JPEG / WebP (printed by the real piexif; its reader needs type 7 here)
PIEXIF_BLOCK = (
    b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x87i\x00\x04\x00\x00\x00\x01\x00\x00\x00\x1a\x00\x00"
    b"\x00\x00\x00\x01\x92\x86\x00\x07\x00\x00\x00\x1e\x00\x00\x00(UNICODE\x00\x00S\x00t\x00e\x00p\x00s"
    b"\x00:\x00 \x003\x00,\x00 '\x13"
)


def test_the_exif_block_is_piexifs_byte_for_byte() -> None:
    """PIL's Image.Exif writes UserComment as BYTE, which piexif.load returns as a tuple that
    A1111's read_info_from_image cannot decode; the block must be piexif's."""
    assert user_comment("Steps: 3, ✓") == PIEXIF_BLOCK
    for fmt in ("jpeg", "webp"):
        img = Image.open(io.BytesIO(encode(Image.new("RGB", (8, 8)), {}, "Steps: 3, ✓", Encoding(fmt))))
        assert img.info["exif"] in (PIEXIF_BLOCK, PIEXIF_BLOCK[6:])  # WebP keeps it without "Exif\0\0"


def test_extras_answer_in_the_callers_samples_format(a1111: TestClient) -> None:
    """A1111 encodes extra-single-image / extra-batch-images with the same encode_pil_to_base64."""
    headers = _key(5)
    picture = png_b64(np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    body = {"image": picture, "upscaler_1": "Lanczos", "upscaling_resize": 2}
    r = a1111.post("/sdapi/v1/extra-single-image", json=body, headers=headers)
    assert r.status_code == 200 and _image(r.json()["image"]).format == "PNG", r.text
    a1111.post("/sdapi/v1/options", json={"samples_format": "webp", "webp_lossless": True}, headers=headers)
    r = a1111.post("/sdapi/v1/extra-single-image", json=body, headers=headers)
    img = _image(r.json()["image"])
    assert img.format == "WEBP" and img.size == (16, 16)
    batch = {"imageList": [{"data": picture, "name": "a"}], "upscaler_1": "Lanczos", "upscaling_resize": 2}
    r = a1111.post("/sdapi/v1/extra-batch-images", json=batch, headers=headers)
    assert r.status_code == 200 and _image(r.json()["images"][0]).format == "WEBP", r.text


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_parameters_too_long_for_a_jpegs_exif_leave_it_out_not_the_image(fmt: str) -> None:
    """A JPEG's EXIF segment holds at most 65,533 bytes; the infotext of an OpenAI request's
    32,000-character prompt and a 4,000-character negative prompt is more than that in UTF-16 (PIL
    raised 'EXIF data is too long': a 500). The image comes back without the parameters; WebP has
    no such limit and keeps them."""
    from service.api.compat import openai_output
    from service.api.compat.openai_schemas import ImageGenerationRequest

    text = "a photo of a cat, " * 2000  # 36,000 characters
    img = Image.new("RGB", (16, 16), (200, 10, 10))
    png = io.BytesIO()
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", text)
    img.save(png, format="PNG", pnginfo=meta)
    req = ImageGenerationRequest(prompt=text[:32_000], output_format=fmt)
    for data in (encode(img, {}, text, Encoding(fmt)), openai_output.encode(png.getvalue(), req)):
        out = Image.open(io.BytesIO(data))
        assert out.format == fmt.upper() and out.size == (16, 16)
        comment = out.getexif().get_ifd(0x8769).get(0x9286)
        assert (comment is None) == (fmt == "jpeg")

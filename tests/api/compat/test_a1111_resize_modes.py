"""A1111's img2img ``resize_mode`` (``modules/images.py`` ``resize_image``): 1 crops to cover the asked
size, 2 fits inside and fills the bands by stretching the edge rows / columns; the mask goes through
the same. Seen through the inpainting overlay: with an all-black mask (nothing repainted) the result
is the init image as A1111 prepares it, pixel for pixel."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api.compat.a1111_resize import fill, resize_image
from tests.support.compat import info, pixels, png_b64

BASE = {"prompt": "a 7", "steps": 2, "seed": 3, "width": 16, "height": 16, "denoising_strength": 0.5}


@pytest.fixture(scope="module")
def a1111(make_client: Callable[..., TestClient]) -> Iterator[TestClient]:
    with make_client() as c:
        yield c


def _source() -> np.ndarray:
    """32 wide, 16 high, gray (the tiny model is one channel): a white first row, then columns of
    distinct grays up to 155."""
    img = np.zeros((16, 32, 3), np.uint8)
    img[:, :, :] = (np.arange(32, dtype=np.uint8) * 5)[None, :, None]
    img[0] = 255
    return img


def _kept(client: TestClient, mode: int) -> np.ndarray:
    """The result of an img2img whose mask repaints nothing: the init image as prepared."""
    body = {**BASE, "init_images": [png_b64(_source())], "mask": png_b64(np.zeros((16, 32, 3), np.uint8))}
    r = client.post("/sdapi/v1/img2img", json={**body, "mask_blur": 0, "resize_mode": mode})
    assert r.status_code == 200, r.text
    assert not any("resize_mode" in c for c in info(r.json())["comments"])
    return pixels(r.json()["images"][0])


def test_crop_and_resize_keeps_the_centre(a1111: TestClient) -> None:
    """Mode 1 on 32x16 -> 16x16: the height already fits (scale 1), the middle 16 columns stay."""
    assert np.array_equal(_kept(a1111, 1), _source()[:, 8:24])


def test_resize_and_fill_fits_inside_and_stretches_the_edges(a1111: TestClient) -> None:
    """Mode 2 on 32x16 -> 16x16: the image at 16x8 in rows 4-11; rows 0-3 are its first row
    stretched (bright), rows 12-15 its last row; A1111's geometry, pixel for pixel."""
    out = _kept(a1111, 2)
    fitted = np.asarray(Image.fromarray(_source()).resize((16, 8), Image.Resampling.LANCZOS))
    assert np.array_equal(out[4:12], fitted)
    assert (out[:4, :, 0] > out[12:, :, 0]).all() and (out[:4, :, 0] >= 120).all()  # the white edge, 4 rows
    assert np.array_equal(out, np.asarray(resize_image(2, Image.fromarray(_source()), 16, 16)))
    stretched = _kept(a1111, 0)  # mode 0 (as before): the whole image squeezed to 16x16
    assert not np.array_equal(stretched, out)


@pytest.mark.parametrize(("size", "mode"), [((16, 32), 1), ((16, 32), 2), ((40, 20), 1), ((40, 20), 2)])
def test_modes_give_the_asked_size_for_either_aspect(size: tuple[int, int], mode: int) -> None:
    src = Image.fromarray(_source())
    for target in ((16, 16), (8, 24), (24, 8), (32, 16)):
        assert resize_image(mode, src.resize(size), *target).size == target
    # the same aspect: both modes are a plain resize
    assert np.array_equal(
        np.asarray(resize_image(mode, src, 64, 32)),
        np.asarray(src.resize((64, 32), Image.Resampling.LANCZOS)),
    )


def test_fill_paints_the_masked_area_from_around_it() -> None:
    """masking.fill: unmasked pixels stay; a masked band takes the colour of what surrounds it."""
    img = np.zeros((16, 16, 3), np.uint8)
    img[:, :] = (40, 80, 120)
    img[:, 8:] = 250  # the masked half is white
    mask = np.zeros((16, 16), np.uint8)
    mask[:, 8:] = 255
    out = np.asarray(fill(Image.fromarray(img), Image.fromarray(mask)))
    assert np.array_equal(out[:, :8], img[:, :8])
    assert np.abs(out[:, 8:].astype(int) - (40, 80, 120)).max() <= 8  # no white left (premultiplied rounding)


def test_inpainting_fill_0_is_a1111s_default_and_starts_from_the_filled_image(a1111: TestClient) -> None:
    """The API's inpainting_fill defaults to 0 ("fill"): at a small denoising strength the masked area
    comes back as the fill (dark, from the unmasked half), not as the original (white, fill 1); the
    unmasked half is the init image as sent either way (the overlay)."""
    init = np.zeros((16, 16, 3), np.uint8)
    init[:, :8] = 30
    init[:, 8:] = 255
    mask = np.zeros((16, 16, 3), np.uint8)
    mask[:, 8:] = 255
    body = {**BASE, "init_images": [png_b64(init)], "mask": png_b64(mask), "mask_blur": 0}
    body["denoising_strength"] = 0.02
    filled = a1111.post("/sdapi/v1/img2img", json=body).json()
    original = a1111.post("/sdapi/v1/img2img", json={**body, "inpainting_fill": 1}).json()
    f, o = pixels(filled["images"][0]), pixels(original["images"][0])
    # (the mask reaches the overlay at the model's 8x8 and back: columns 6-9 are its soft edge)
    assert np.array_equal(f[:, :6], init[:, :6]) and np.array_equal(o[:, :6], init[:, :6])
    assert f[:, 10:].mean() < 90 and o[:, 10:].mean() > 200, (f[:, 10:].mean(), o[:, 10:].mean())
    assert not any("inpainting_fill" in c for c in info(filled)["comments"])


def test_include_init_images_echoes_them_in_parameters(a1111: TestClient) -> None:
    """img2imgapi: without include_init_images, parameters.init_images and mask are null; with it,
    they come back as sent."""
    image = png_b64(_source())
    body = {**BASE, "init_images": [image], "mask": image}
    plain = a1111.post("/sdapi/v1/img2img", json=body).json()["parameters"]
    assert plain["init_images"] is None and plain["mask"] is None
    echoed = a1111.post("/sdapi/v1/img2img", json={**body, "include_init_images": True}).json()["parameters"]
    assert echoed["init_images"] == [image] and echoed["mask"] == image

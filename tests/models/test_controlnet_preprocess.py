"""ControlNet control images: A1111's three resize modes on a control image of the wrong size, the
effective-region mask, and the weight-free preprocessors on images whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.models.controlnet import preprocess
from service.models.controlnet.units import control_image, resize_mode
from service.serving.request import ControlNetRef
from tests.models.test_controlnet_diffusers import png_image  # noqa: F401  (diffusers extra)


def _bars(h: int, w: int) -> np.ndarray:
    """Left half red, right half blue, a green one-pixel border."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2, 0] = 255
    img[:, w // 2 :, 2] = 255
    img[0, :], img[-1, :], img[:, 0], img[:, -1] = (0, 255, 0), (0, 255, 0), (0, 255, 0), (0, 255, 0)
    return img


def test_resize_modes_as_a1111() -> None:
    img = _bars(40, 80)  # 2:1 into a square
    stretched = preprocess.fit(img, 64, 64, 0)
    cropped = preprocess.fit(img, 64, 64, 1)
    filled = preprocess.fit(img, 64, 64, 2)
    assert stretched.shape == cropped.shape == filled.shape == (64, 64, 3)
    # crop and resize: scaled to 128x64 and centre-cropped: the middle of the bars, no side border
    assert cropped[32, 2, 0] > 200 and cropped[32, 61, 2] > 200 and cropped[32, 2, 1] < 50
    # resize and fill: scaled to 64x32, centred, the rest the border's median colour (green)
    assert tuple(filled[2, 32]) == (0, 255, 0) and tuple(filled[61, 32]) == (0, 255, 0)
    assert filled[32, 10, 0] > 200 and filled[32, 54, 2] > 200
    assert (
        resize_mode("Crop and Resize") == 1
        and resize_mode("envelope (outer fit)") == 2
        and resize_mode(0) == 0
    )


def test_unit_image_of_another_size_and_region_mask() -> None:
    import base64
    import io

    from PIL import Image

    def b64(arr: np.ndarray) -> str:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    mask = np.zeros((20, 40), np.uint8)
    mask[:, 20:] = 255
    unit = ControlNetRef("x", b64(_bars(20, 40)), resize_mode="Just Resize", mask=b64(mask))
    hint = control_image(unit, 32, 48, "controlnets[0]")
    assert hint.shape == (4, 32, 48) and hint.dtype == torch.uint8
    assert int(hint[3, :, :20].max()) == 0 and int(hint[3, :, 28:].min()) == 255


def test_preprocessors() -> None:
    img = np.zeros((32, 32, 3), np.uint8)
    img[8:24, 8:24] = 255  # a white square
    edges = preprocess.canny(img, 100, 200)[:, :, 0]
    assert set(np.unique(edges)) <= {0, 255}
    assert edges[16, 7:10].max() == 255 and edges[16, 16] == 0 and edges[2, 2] == 0  # its outline only
    assert (preprocess.invert(img, None, None) == 255 - img).all()
    assert set(np.unique(preprocess.threshold(img // 2 + 60, 127, None))) == {0, 255}
    assert preprocess.tile_resample(img, 2.0, None).shape == (16, 16, 3)
    with pytest.raises(KeyError):
        preprocess.run("depth", img, None, None, None)
    assert preprocess.module_name("Invert (from white bg & black line)") == "invert"

"""The real ``webuiapi`` client's ControlNet helpers against `kdiff serve` on a tiny Stable Diffusion
model with tiny ControlNets in ``model_store/controlnet/``: ``ControlNetUnit`` units on txt2img
(sent as ``alwayson_scripts["ControlNet"]``), ``controlnet_model_list``, ``controlnet_module_list``,
``controlnet_version`` and ``controlnet_detect``; the unit's image is the same as our own
``controlnets`` field's, and a disabled unit is no unit."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")
import requests  # noqa: E402
import webuiapi  # noqa: E402

from tests.models.test_controlnet_diffusers import control_png, png_image  # noqa: E402
from tests.support.controlnet_tiny import add_controlnets  # noqa: E402
from tests.support.sd_tiny import frontend_server  # noqa: E402
from tests.support.server import Server  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with frontend_server(tmp_path_factory, add_controlnets, KDIFF_DEFAULT_MODEL="sd1") as srv:
        yield srv


def _api(server: Server) -> Any:
    # every call with controlnet_units passes its own alwayson_scripts: webuiapi writes the units into
    # its default ``alwayson_scripts={}``, one dict shared by every later call in the process, so later
    # tests' plain txt2img calls (other modules, servers without these ControlNets) would send them too
    return webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1", sampler="Euler", steps=4)


def test_webuiapi_controlnet_unit(server: Server) -> None:
    api = _api(server)
    assert "cn_a" in api.controlnet_model_list() and "canny" in api.controlnet_module_list()
    assert api.controlnet_version() >= 2
    control = png_image(control_png(6))
    kw: dict[str, Any] = {"prompt": "a red cat", "seed": 9, "width": 64, "height": 64, "cfg_scale": 5.0}
    unit = webuiapi.ControlNetUnit(
        image=control, module="none", model="cn_a", weight=0.9, resize_mode="Just Resize", control_mode=0
    )
    with_unit = api.txt2img(controlnet_units=[unit], alwayson_scripts={}, **kw)
    off = webuiapi.ControlNetUnit(image=control, model="cn_a", enabled=False)
    without = api.txt2img(controlnet_units=[off], alwayson_scripts={}, **kw)
    ours = requests.post(
        f"{server.url}/sample",
        timeout=120,
        json={
            "model": "sd1",
            "prompt": "a red cat",
            "seed": 9,
            "steps": 4,
            "sampler": "euler",
            "cfg_scale": 5.0,
            "width": 64,
            "height": 64,
            "controlnets": [{"model": "cn_a", "image": control_png(6), "weight": 0.9, "resize_mode": 0}],
        },
    ).json()
    a, b = np.asarray(with_unit.image, np.int16), np.asarray(without.image, np.int16)
    assert np.abs(a - np.asarray(png_image(ours["images"][0]), np.int16)).max() <= 1
    assert np.abs(a - b).max() > 2  # the unit acts; the disabled one does not
    edges = api.controlnet_detect([control], module="canny", threshold_a=50, threshold_b=120)
    assert len(edges.images) == 1 and set(np.unique(np.asarray(edges.images[0]))) <= {0, 255}


def test_webuiapi_hr_option_picks_the_hires_passes(server: Server) -> None:
    """ControlNetUnit(hr_option=...) with a hires fix, as the extension runs it: a unit in the first
    pass changes the image a lot (the composition), one in the second pass little (low noise there);
    so "High res only" stays next to the run without the unit while "Low res only" and "Both" move
    away (before, every unit acted in both passes). Which rows each pass carries is checked exactly
    in tests/models/test_controlnet_hires_passes.py. An unknown value is a 422 naming the field."""
    api = _api(server)
    control = png_image(control_png(6))
    kw: dict[str, Any] = {"prompt": "a red cat", "seed": 9, "width": 64, "height": 64, "cfg_scale": 5.0}
    kw |= {"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 2}
    kw["denoising_strength"] = 0.4
    out = {}
    for option in ("Both", "Low res only", "High res only"):
        unit = webuiapi.ControlNetUnit(image=control, model="cn_a", weight=1.5, hr_option=option)
        result = api.txt2img(controlnet_units=[unit], alwayson_scripts={}, **kw)
        out[option] = np.asarray(result.image, np.int16)
    none = np.asarray(api.txt2img(**kw).image, np.int16)
    assert {a.shape for a in out.values()} == {(128, 128, 3)}
    gap = {k: int(np.abs(a - none).max()) for k, a in out.items()}
    assert gap["High res only"] <= 2 and gap["Low res only"] > 8 and gap["Both"] > 8, gap
    bad = webuiapi.ControlNetUnit(image=control, model="cn_a", hr_option="Sometimes")
    r = requests.post(f"{server.url}/sdapi/v1/txt2img", timeout=60, json={
        **kw, "steps": 2, "alwayson_scripts": {"controlnet": {"args": [bad.to_dict()]}}})  # fmt: skip
    assert r.status_code == 422 and "hr_option" in r.text, r.text

"""The playground's ControlNet section in headless Chromium, against a live server with a tiny SD 1.x
model and tiny ControlNets in ``model_store/controlnet/`` (the real layouts); run by
``test_playground.py`` on the server it shares with the hires section's test.

As a person would use it: the section shows for a model that takes ControlNet units and not for the
digits model; the ControlNets and preprocessors come from ``/controlnet/control_types`` and
``module_list``; "Preview preprocessor" shows what ``/controlnet/detect`` makes of the chosen file;
Generate sends the unit (the file's own bytes, the chosen model, module, weight, window, modes) and
the image equals the same body sent to ``/sample`` by hand, and differs from the image without the
unit; a ControlNet unknown to the service, one for another base model and an out-of-range weight
are each shown next to the section's control they name.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import httpx
import numpy as np
from PIL import Image, ImageDraw
from playwright.sync_api import Page, expect

from tests.support.server import Server

from .browser import artifacts


def _control_png() -> bytes:
    """A drawing with edges for canny: a white disc and a grey bar on black, 96x64 (not the
    generation size, so the resize mode matters)."""
    img = Image.new("RGB", (96, 64), "black")
    d = ImageDraw.Draw(img)
    d.ellipse((10, 8, 50, 48), fill="white")
    d.rectangle((60, 20, 90, 30), fill=(128, 128, 128))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _pixels(data_url_or_b64: str) -> np.ndarray:
    b64 = data_url_or_b64.split(",", 1)[-1]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def _generate(page: Page) -> tuple[np.ndarray, dict[str, Any]]:
    """Click Generate; the image shown and the body the page sent to POST /jobs."""
    with page.expect_request(lambda r: r.url.endswith("/jobs") and r.method == "POST") as req:
        page.click("#generate")
    body = req.value.post_data_json
    expect(page.locator("#status")).to_contain_text("Done", timeout=60_000)
    src = page.locator("#results figure img").first.get_attribute("src") or ""
    return _pixels(src), body


def _sample(server: Server, body: dict[str, Any]) -> np.ndarray:
    r = httpx.post(f"{server.url}/sample", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return _pixels(r.json()["images"][0])


def check_controlnet_section(page: Page, console: Any, server: Server) -> None:
    """``page``: the playground, loaded; ``console``: its Console (test_playground.py)."""

    # the section follows the model: shown for sd1 (takes controlnets), hidden for digits
    expect(page.locator("#cn-box")).to_be_visible()
    page.select_option("#model", "digits")
    expect(page.locator("#cn-box")).to_be_hidden()
    page.select_option("#model", "sd1")
    expect(page.locator("#cn-box")).to_be_visible()
    expect(page.locator("#cn-type-row")).to_be_hidden()  # no union ControlNet chosen
    listed = httpx.get(f"{server.url}/controlnet/control_types").json()["control_types"]["All"]["model_list"]
    assert page.locator("#cn_model option").all_text_contents() == listed[1:]  # without "None"
    assert {"cn_a", "cn_xl", "control_v11p_sd15_tiny"} <= set(listed)
    modules = httpx.get(f"{server.url}/controlnet/module_list").json()["module_list"]
    assert page.locator("#cn_module option").all_text_contents() == modules
    # the openpose modules are the server's to list (only with their weights in annotators/): none here
    assert not [m for m in modules if m.startswith("openpose")], modules

    # the preprocessor preview is /controlnet/detect's answer for the chosen file
    png = _control_png()
    b64 = base64.b64encode(png).decode()
    page.set_input_files("#cn_image", {"name": "disc.png", "mimeType": "image/png", "buffer": png})
    expect(page.locator("#cn_on")).to_be_checked()
    page.select_option("#cn_module", "canny")
    page.click("#cn-detect")
    expect(page.locator("#cn-preview")).to_be_visible(timeout=15_000)
    shown = _pixels(page.locator("#cn-preview").get_attribute("src") or "")
    detect = {"controlnet_module": "canny", "controlnet_input_images": [b64], "controlnet_processor_res": -1}
    ref = httpx.post(f"{server.url}/controlnet/detect", json=detect, timeout=30).json()["images"][0]
    assert np.array_equal(shown, _pixels(ref))
    assert shown.shape == (64, 96, 3) and set(np.unique(shown)) == {0, 255}  # edges, white on black
    page.screenshot(path=str(artifacts() / "controlnet-preview.png"), full_page=True)

    # Generate sends the unit as set in the section; the image is /sample's for the same body
    page.fill("#prompt", "a red cat")
    for field, value in (("#width", "64"), ("#height", "64"), ("#steps", "3"), ("#seed", "4")):
        page.fill(field, value)
    page.fill("#cfg_scale", "5")
    page.select_option("#cn_model", "control_v11p_sd15_tiny")
    page.fill("#cn_weight", "1.5")
    page.fill("#cn_guidance_end", "0.7")
    page.select_option("#cn_control_mode", "ControlNet is more important")
    page.select_option("#cn_resize_mode", "Resize and Fill")
    image, body = _generate(page)
    unit = body["controlnets"][0]
    assert unit == {
        "model": "control_v11p_sd15_tiny",
        "image": b64,  # the file's own bytes
        "module": "canny",
        "weight": 1.5,
        "guidance_start": 0,
        "guidance_end": 0.7,
        "control_mode": "ControlNet is more important",
        "resize_mode": "Resize and Fill",
    }
    assert np.array_equal(image, _sample(server, body))
    plain = _sample(server, {k: v for k, v in body.items() if k != "controlnets"})
    diff = int(np.abs(image - plain).max())
    assert diff > 2, f"the unit changed nothing ({diff})"
    page.screenshot(path=str(artifacts() / "controlnet.png"), full_page=True)

    # switched off: no unit is sent
    page.uncheck("#cn_on")
    image_off, body_off = _generate(page)
    assert "controlnets" not in body_off and np.array_equal(image_off, plain)
    page.check("#cn_on")

    # errors land next to the section's controls: unknown ControlNet, wrong base model, bad weight
    console.allowed.add(422)
    page.evaluate("document.getElementById('cn_model').add(new Option('ghost', 'ghost'))")
    page.select_option("#cn_model", "ghost")
    page.click("#generate")
    expect(page.locator("#err-cn_model")).to_contain_text("unknown ControlNet 'ghost'")
    expect(page.locator("#err-cn_model")).to_contain_text("cn_a")  # the ones there are
    expect(page.locator("#cn_model")).to_have_attribute("aria-invalid", "true")
    page.select_option("#cn_model", "cn_xl")
    page.click("#generate")
    expect(page.locator("#err-cn_model")).to_contain_text("is for SDXL")
    page.select_option("#cn_model", "cn_a")
    page.fill("#cn_weight", "20")
    page.click("#generate")
    expect(page.locator("#err-cn_weight")).to_contain_text("less than or equal to 10")
    page.screenshot(path=str(artifacts() / "controlnet-error.png"), full_page=True)
    console.allowed.clear()
    print("\ncontrolnet section:", json.dumps({"unit": {**unit, "image": f"<{len(png)} bytes>"}}))

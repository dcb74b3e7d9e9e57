"""The playground's ControlNet-Union control type, IP-Adapter section and step cache in headless
Chromium, against the live server ``test_playground.py`` shares with the hires and ControlNet
sections' tests; :func:`add_units` puts the tiny SDXL model, h94-layout IP-Adapters
(tests/support/ipadapter_tiny.py) and xinsir-layout ControlNet-Unions of 6 and 8 types
(tests/support/union_tiny.py) in its store.

As a person would use it, on one page load: a union ControlNet offers the control types its weights
serve (6 for controlnet-union-sdxl-1.0's layout, 8 for ProMax's; none for a plain ControlNet); the
IP-Adapter section lists the store's adapters; the step cache offers the methods the model's network
runs. Generate sends each as the API documents (the unit's ``control_type``, ``ip_adapters: [{model,
image, weight}]``, ``cache``), the image shown equals what POST /sample returns for the body the page
sent, each setting changes the image, the recorded parameters show the cache, and a bad value is
shown next to the control it names.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image, ImageDraw
from playwright.sync_api import Page, expect

from service.models.controlnet.union import TYPES
from tests.support.server import Server

from .browser import artifacts
from .playground_controlnet import _control_png, _pixels, _sample


def add_units(store: Path) -> None:
    """The shared IP-Adapter store's ``sdxl`` model and adapters linked into ``store`` (which has the
    tiny ``sd1``, built by the same save_diffusers as the adapters' sd1), and the union ControlNets."""
    from tests.support.ipadapter_tiny import ip_store
    from tests.support.union_tiny import add_unions

    shared, _ = ip_store()
    for name in ("sdxl", "ipadapter"):
        (store / name).symlink_to(shared / name, target_is_directory=True)
    (store / "controlnet").mkdir(exist_ok=True)
    add_unions(store)


def _square_png() -> bytes:
    """A reference image for the IP-Adapter: a red square on black, 96x64 (not the encoder's size)."""
    img = Image.new("RGB", (96, 64), "black")
    ImageDraw.Draw(img).rectangle((30, 10, 80, 60), fill=(220, 30, 30))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _generate(page: Page) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
    """Click Generate: the image shown, the body the page sent to POST /jobs, the parameters shown."""
    page.evaluate("document.getElementById('results').replaceChildren()")
    with page.expect_request(lambda r: r.url.endswith("/jobs") and r.method == "POST") as req:
        page.click("#generate")
    expect(page.locator("#results figure img")).to_have_count(1, timeout=60_000)
    src = page.locator("#results figure img").first.get_attribute("src") or ""
    shown = json.loads(page.locator("#results pre").first.text_content() or "{}")
    return _pixels(src), req.value.post_data_json, shown


def _differs(a: np.ndarray, b: np.ndarray, what: str) -> None:
    diff = int(np.abs(a - b).max())
    assert diff > 2, f"{what} changed nothing ({diff})"


def _options(page: Page, select: str) -> list[str]:
    return page.locator(f"{select} option").all_text_contents()


def _union(page: Page, server: Server) -> dict[str, Any]:
    """SDXL with a ProMax-layout union ControlNet: the control type is the unit's ``control_type``."""
    listed = httpx.get(f"{server.url}/controlnet/model_list").json()["union_types"]
    assert listed == {"union_promax": list(TYPES), "union_xl": list(TYPES[:6])}
    page.select_option("#model", "sdxl")
    page.select_option("#cn_model", "cn_a")  # a plain ControlNet: no control type
    expect(page.locator("#cn-type-row")).to_be_hidden()
    page.select_option("#cn_model", "union_xl")
    expect(page.locator("#cn-type-row")).to_be_visible()
    assert _options(page, "#cn_control_type") == [*TYPES[:6], "auto"]
    page.select_option("#cn_model", "union_promax")
    assert _options(page, "#cn_control_type") == [*TYPES, "auto"]  # + tile, repaint
    page.select_option("#cn_control_type", "depth")

    png = _control_png()
    page.set_input_files("#cn_image", {"name": "disc.png", "mimeType": "image/png", "buffer": png})
    page.select_option("#cn_module", "none")
    page.fill("#prompt", "a red cat")
    for field, value in (("#width", "64"), ("#height", "64"), ("#steps", "3"), ("#seed", "4")):
        page.fill(field, value)
    page.fill("#cfg_scale", "5")
    image, body, _ = _generate(page)
    unit = body["controlnets"][0]
    assert unit["model"] == "union_promax" and unit["control_type"] == "depth", unit
    assert unit["image"] == base64.b64encode(png).decode() and unit["module"] == "none"
    assert np.array_equal(image, _sample(server, body))
    other = {**body, "controlnets": [{**unit, "control_type": "canny"}]}
    _differs(image, _sample(server, other), "the control type")
    page.screenshot(path=str(artifacts() / "union.png"), full_page=True)
    page.uncheck("#cn_on")
    return unit


def _ip_adapter_and_cache(page: Page, server: Server) -> dict[str, Any]:
    """SD 1.x with an IP-Adapter and DeepCache: ``ip_adapters`` and ``cache`` as the API documents."""
    page.select_option("#model", "digits")  # the store has adapters, the digits model takes none
    expect(page.locator("#ip-box")).to_be_hidden()
    page.select_option("#model", "sd1")
    expect(page.locator("#ip-box")).to_be_visible()
    adapters = httpx.get(f"{server.url}/controlnet/control_types").json()["control_types"]["IP-Adapter"]
    assert _options(page, "#ip_model") == adapters["model_list"][1:]  # without "None"
    expect(page.locator("#cache-row")).to_be_visible()
    assert _options(page, "#cache_method") == ["off", "deepcache"]

    png = _square_png()
    page.set_input_files("#ip_image", {"name": "square.png", "mimeType": "image/png", "buffer": png})
    expect(page.locator("#ip_on")).to_be_checked()
    page.select_option("#ip_model", "ip-adapter_sd15")
    page.fill("#ip_weight", "0.8")
    page.select_option("#cache_method", "deepcache")
    page.fill("#cache_interval", "2")
    image, body, shown = _generate(page)
    assert "controlnets" not in body
    b64 = base64.b64encode(png).decode()
    assert body["ip_adapters"] == [{"model": "ip-adapter_sd15", "image": b64, "weight": 0.8}]
    assert body["cache"] == {"method": "deepcache", "interval": 2}
    assert shown["cache"]["method"] == "deepcache" and shown["cache"]["interval"] == 2, shown
    assert np.array_equal(image, _sample(server, body))
    _differs(image, _sample(server, {k: v for k, v in body.items() if k != "ip_adapters"}), "the IP-Adapter")
    # the tiny UNet's cached steps move its image by a level or so: any change shows the cache ran
    assert not np.array_equal(image, _sample(server, {k: v for k, v in body.items() if k != "cache"}))
    page.screenshot(path=str(artifacts() / "ip-adapter-cache.png"), full_page=True)
    # loading the image's PNG restores the cache it recorded
    src = page.locator("#results figure img").first.get_attribute("src") or ""
    page.select_option("#cache_method", "off")
    page.fill("#cache_interval", "")
    made = {"name": "cat.png", "mimeType": "image/png", "buffer": base64.b64decode(src.split(",", 1)[1])}
    page.set_input_files("#load-png", made)
    expect(page.locator("#banner")).to_contain_text("restored")
    expect(page.locator("#cache_method")).to_have_value("deepcache")
    expect(page.locator("#cache_interval")).to_have_value("2")
    return body


def _errors(page: Page) -> None:
    """An adapter for another base model and a cache with both rules: each next to its control."""
    page.select_option("#ip_model", "ip-adapter_sdxl")
    page.click("#generate")
    other_base = "ip-adapter_sdxl' is for a UNet (cross_attention_dim 80"
    expect(page.locator("#err-ip_model")).to_contain_text(other_base)
    expect(page.locator("#ip_model")).to_have_attribute("aria-invalid", "true")
    page.select_option("#ip_model", "ip-adapter_sd15")
    page.fill("#cache_threshold", "0.2")
    page.click("#generate")
    expect(page.locator("#err-cache_interval")).to_contain_text("interval or threshold, not both")
    expect(page.locator("#cache_interval")).to_have_attribute("aria-invalid", "true")
    page.screenshot(path=str(artifacts() / "cache-error.png"), full_page=True)


def check_units(page: Page, console: Any, server: Server) -> None:
    """``page``: the playground, loaded; ``console``: its Console (test_playground.py)."""
    unit = _union(page, server)
    body = _ip_adapter_and_cache(page, server)
    console.allowed.add(422)
    _errors(page)
    console.allowed.clear()
    short = {"union unit": {**unit, "image": "<png>"}, "cache": body["cache"], "ip": len(body["ip_adapters"])}
    print("\nplayground units:", json.dumps(short))

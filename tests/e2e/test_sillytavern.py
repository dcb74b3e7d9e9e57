"""SillyTavern's Stable Diffusion extension against a real server, with the requests it sends.

Read from SillyTavern's public source (commit ba6f7b7a, 2024-09-28):
`src/endpoints/stable-diffusion.js` (the server-side proxy: which /sdapi/v1 routes, methods and
headers) and `public/scripts/extensions/stable-diffusion/index.js` (`defaultSettings`,
`validateAutoUrl`, `loadSettingOptions`, `onModelChange`, `generateAutoImage`):

1. connect: ``/api/sd/ping`` -> ``GET /sdapi/v1/options``;
2. ``loadSettingOptions`` (all at once): ``GET samplers``; ``GET options`` (the current model),
   ``GET sd-models``, ``GET upscalers`` + ``GET latent-upscale-modes``; ``GET schedulers``;
   ``GET sd-vae``;
3. picking a model: ``POST options {"sd_model_checkpoint": <title>}``, then ``GET progress`` until
   progress 0 and job_count 0;
4. generating: ``POST txt2img`` with the extension's whole request body (its ``url`` and ``auth``
   included: the proxy forwards ``request.body`` as it is), ``Authorization: Basic base64(auth)``.

Its defaults: sampler "DDIM", scheduler "normal", 20 steps, cfg 7, 512x512, clip skip 1, no seed.
Every sampler and scheduler the server lists must then make an image on the shipped digits model
(continuous-time) and on a tiny Stable Diffusion model (discrete-time).
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.support.server import REPO, Server

AUTH = ""  # SillyTavern's default auto_auth: it still sends "Basic " + base64(""), which a server
# reads as "Basic" (HTTP strips a header value's trailing whitespace; httpx refuses to send it)
HEADERS = {"Authorization": ("Basic " + base64.b64encode(AUTH.encode()).decode()).strip()}
PREFIX = "best quality, absurdres, aesthetic,"  # defaultPrefix
NEGATIVE = (  # defaultNegative
    "lowres, bad anatomy, bad hands, text, error, cropped, worst quality, low quality, normal quality, "
    "jpeg artifacts, signature, watermark, username, blurry"
)


def st_body(url: str, prompt: str, **settings: Any) -> dict[str, Any]:
    """generateAutoImage's body with SillyTavern's default settings (``settings`` as a user set them)."""
    s = {
        "sampler": "DDIM",
        "scheduler": "normal",
        "steps": 20,
        "scale": 7,
        "width": 512,
        "height": 512,
        "clip_skip": 1,
        # its hires settings (defaultSettings: off, "Latent", 2.0, 0.7, 0 = the first pass's steps)
        "enable_hr": False,
        "hr_upscaler": "Latent",
        "hr_scale": 2.0,
        "denoising_strength": 0.7,
        "hr_second_pass_steps": 0,
        **settings,
    }
    return {
        "url": url,
        "auth": AUTH,
        "prompt": f"{PREFIX} {prompt}",
        "negative_prompt": NEGATIVE,
        "sampler_name": s["sampler"],
        "scheduler": s["scheduler"],
        "steps": s["steps"],
        "cfg_scale": s["scale"],
        "width": s["width"],
        "height": s["height"],
        "restore_faces": False,
        "enable_hr": s["enable_hr"],
        "hr_upscaler": s["hr_upscaler"],
        "hr_scale": s["hr_scale"],
        "denoising_strength": s["denoising_strength"],
        "hr_second_pass_steps": s["hr_second_pass_steps"],
        # seed -1 is sent as undefined, which JSON.stringify leaves out; sd_vae likewise
        "override_settings": {"CLIP_stop_at_last_layers": s["clip_skip"]},
        "override_settings_restore_afterwards": True,
        "clip_skip": s["clip_skip"],
        "save_images": True,
        "send_images": True,
        "do_not_save_grid": False,
        "do_not_save_samples": False,
    }


def connect(c: httpx.Client) -> dict[str, Any]:
    """Steps 1 and 2: what SillyTavern reads, as it reads it (names from each list)."""
    assert c.get("/sdapi/v1/options").status_code == 200  # ping
    samplers = [x["name"] for x in c.get("/sdapi/v1/samplers").json()]
    current = c.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
    models = [x["title"] for x in c.get("/sdapi/v1/sd-models").json()]
    upscalers = [x["name"] for x in c.get("/sdapi/v1/upscalers").json()]
    latent = [x["name"] for x in c.get("/sdapi/v1/latent-upscale-modes").json()]
    schedulers = [x["name"] for x in c.get("/sdapi/v1/schedulers").json()]
    vaes = [x["model_name"] for x in c.get("/sdapi/v1/sd-vae").json()]
    assert current in models and upscalers and isinstance(latent, list) and isinstance(vaes, list)
    return {"samplers": samplers, "schedulers": schedulers, "models": models}


def pick_model(c: httpx.Client, title: str) -> None:
    """Step 3: set-model, then wait for the progress to be idle (at most 10 polls, as SillyTavern)."""
    assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": title}).status_code == 200
    for _ in range(10):
        p = c.get("/sdapi/v1/progress").json()
        if p["progress"] == 0.0 and p["state"]["job_count"] == 0:
            return
    raise AssertionError("progress never idle")


def generate(c: httpx.Client, body: dict[str, Any]) -> tuple[Image.Image, dict[str, Any]]:
    r = c.post("/sdapi/v1/txt2img", json=body, timeout=300)
    assert r.status_code == 200, (body["sampler_name"], body["scheduler"], r.text[:400])
    out = r.json()
    image = Image.open(io.BytesIO(base64.b64decode(out["images"][0])))  # SillyTavern reads images[0]
    return image, json.loads(out["info"])


def sweep(c: httpx.Client, url: str, samplers: list[str], schedulers: list[str], **settings: Any) -> int:
    """Every sampler with every scheduler, 8 at a time (the engine batches them)."""
    pairs = [(s, k) for s in samplers for k in schedulers]

    def one(pair: tuple[str, str]) -> None:
        image, _ = generate(c, st_body(url, "a 3", sampler=pair[0], scheduler=pair[1], **settings))
        assert image.size == (settings["width"], settings["height"])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, pairs))
    return len(pairs)


@pytest.fixture(scope="module")
def st_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The shipped digits model and a tiny SD 1.x model (random weights), no keys (a local A1111)."""
    from tests.support.sd_tiny import digits_and_tiny_sd_store

    store = digits_and_tiny_sd_store(tmp_path_factory.mktemp("st-store"))
    srv = Server(store, tmp_path_factory.mktemp("st-log") / "server.log", KDIFF_DEFAULT_MODEL="digits")
    try:
        srv.wait_ready(120)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def st(st_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=st_server.url, headers=HEADERS, timeout=120) as c:
        yield c


def test_first_request_with_sillytaverns_defaults_on_the_digits_model(
    st: httpx.Client, st_server: Server
) -> None:
    lists = connect(st)
    assert "normal" in lists["schedulers"] and "DDIM" in lists["samplers"]
    image, info = generate(st, st_body(st_server.url, "the digit 7"))
    assert image.size == (512, 512)
    # the continuous-time model ran A1111's "normal" as its equivalent, and says so
    assert any("'normal' ran as its equivalent 'exponential'" in c for c in info["comments"]), info[
        "comments"
    ]
    assert info["scheduler"] == "Exponential" and info["sd_model_name"] == "digits"


def test_every_sampler_with_every_scheduler_on_the_digits_model(st: httpx.Client, st_server: Server) -> None:
    lists = connect(st)
    pick_model(st, "digits")
    n = sweep(st, st_server.url, lists["samplers"], lists["schedulers"], steps=3, width=64, height=64)
    assert n == len(lists["samplers"]) * len(lists["schedulers"]) >= 12 * 20


def test_every_scheduler_and_sampler_on_a_tiny_sd_model(st: httpx.Client, st_server: Server) -> None:
    lists = connect(st)
    assert "sd1" in lists["models"]
    pick_model(st, "sd1")
    try:
        image, info = generate(st, st_body(st_server.url, "a cat", steps=2, width=64, height=64))
        assert info["sd_model_name"] == "sd1" and info["scheduler"] != "Exponential"  # runs "normal" itself
        assert not any("equivalent" in c for c in info["comments"])
        n = sweep(st, st_server.url, lists["samplers"], lists["schedulers"], steps=3, width=64, height=64)
        assert n == len(lists["samplers"]) * len(lists["schedulers"])
    finally:
        pick_model(st, "digits")


def test_sillytavern_with_hires_fix_on_a_tiny_sd_model(st: httpx.Client, st_server: Server) -> None:
    """Its hires settings turned on (its default upscaler "Latent", scale 2, strength 0.7, and a
    pixel upscaler from the list it reads): the image SillyTavern shows has the hires size."""
    lists = connect(st)
    pick_model(st, "sd1")
    upscalers = [x["name"] for x in st.get("/sdapi/v1/upscalers").json()]
    try:
        for upscaler, scale in (("Latent", 2.0), (upscalers[-1], 1.5)):
            body = st_body(st_server.url, "a cat", steps=3, width=64, height=64, enable_hr=True,
                           hr_upscaler=upscaler, hr_scale=scale)  # fmt: skip
            image, info = generate(st, body)
            assert image.size == (int(64 * scale), int(64 * scale)), (upscaler, image.size)
            text = info["infotexts"][0]
            assert f"Hires upscaler: {upscaler}" in text and "Denoising strength: 0.7" in text, text
        assert "DDIM" in lists["samplers"]
    finally:
        pick_model(st, "digits")


def test_sillytavern_with_an_api_key_entry_as_its_basic_auth(tmp_path: Path) -> None:
    """Its Authentication field "user:pass" (a KDIFF_API_KEYS entry) is sent as HTTP Basic on every
    call; a wrong one fails its connect (the ping) with 401, as A1111's --api-auth does."""
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.api.settings import Settings

    shutil.copytree(REPO / "model_store" / "digits", tmp_path / "digits")
    app = create_app(Settings(model_store=tmp_path, api_keys="st:secret", torch_threads=1, batch_wait_ms=0))
    with TestClient(app) as c:
        wrong = {"Authorization": "Basic " + base64.b64encode(b"st:nope").decode()}
        assert c.get("/sdapi/v1/options", headers=wrong).status_code == 401
        c.headers["Authorization"] = "Basic " + base64.b64encode(b"st:secret").decode()
        lists = connect(c)
        pick_model(c, lists["models"][0])
        body = st_body("http://testserver", "a 5", steps=4) | {"auth": "st:secret"}
        image, info = generate(c, body)
        assert image.size == (512, 512) and info["sd_model_name"] == "digits"


def test_sillytaverns_abort_cancels_the_run_without_an_error_in_the_log(
    st: httpx.Client, st_server: Server
) -> None:
    """A user's Abort: SillyTavern's server drops its upstream connection mid-run (its request's
    `controller.abort()` on the browser's close). The job is cancelled, the progress goes idle, and
    the server logs no asyncio error for the dropped wait."""
    import socket
    import time

    body = json.dumps({**st_body(st_server.url, "a 1", steps=500, sampler="DPM2"), "n_iter": 4}).encode()
    host, port = st_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = (
            f"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Authorization: {HEADERS['Authorization']}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        deadline = time.monotonic() + 30
        while st.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0:
            assert time.monotonic() < deadline, "the run never started"
            time.sleep(0.05)
    deadline = time.monotonic() + 30
    while st.get("/sdapi/v1/progress").json()["state"]["job_count"] != 0:
        assert time.monotonic() < deadline, "the dropped run was not cancelled"
        time.sleep(0.05)
    time.sleep(0.5)  # the cancelled wait is collected after the handler returns
    log = st_server.log_path.read_text()
    assert "never retrieved" not in log, log[-2000:]


def test_inpainting_pastes_the_unmasked_pixels_back_as_sent(st: httpx.Client) -> None:
    """A1111's overlay (processing.apply_overlay): outside the mask an inpainted image is the init
    image pixel for pixel, not its trip through the VAE (the tiny SD model's latents); inside, the
    repaint."""
    import numpy as np

    rng = np.random.default_rng(0)
    init = rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255

    def b64(arr: np.ndarray) -> str:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    body = {
        "prompt": "a cat",
        "steps": 2,
        "width": 64,
        "height": 64,
        "init_images": [b64(init)],
        "mask": b64(mask),
        "mask_blur": 0,
        "denoising_strength": 0.9,
        "override_settings": {"sd_model_checkpoint": "sd1"},
    }
    r = st.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text[:300]
    out = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
    assert np.array_equal(out[:, :32], init[:, :32]) and not np.array_equal(out[:, 32:], init[:, 32:])

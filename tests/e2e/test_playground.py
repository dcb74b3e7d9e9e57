"""The web playground at `/` and the offline /docs, in headless Chromium against a real server.

As a person would use it: load the page, generate a digit, cancel a long job, run a 2x2 sampler
comparison, get a field's error for a bad value, with and without an API key; no console errors.
Screenshots and the page's measured figures (size, first load, grid wall time vs the sum of its
cells) go to tests/artifacts/playground/ (git-ignored).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.server import Server
from tests.support.tiny_store import make_tiny_store

from .browser import ARGS, INSTALL, artifacts, chromium_path, confine_to_localhost

try:
    from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright
except ImportError:  # a missing tool fails the test, it never skips it
    pytest.fail(f"the browser tests need playwright; install it with: {INSTALL}", pytrace=False)

LONG = 10_000  # steps of a job that is still running when the test cancels it
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_store(tmp_path_factory.mktemp("pg-store"))


def _server(store: Path, log: Path, **env: str) -> Server:
    srv = Server(store, log, KDIFF_MAX_STEPS=str(LONG), **env)
    srv.wait_ready()
    return srv


@pytest.fixture(scope="module")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = _server(store, tmp_path_factory.mktemp("pg-log") / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def sd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server with tiny SD 1.x and SDXL models (and digits), tiny ControlNets (plain and union) and
    IP-Adapters, shared by the hires, ControlNet and units sections' tests (a server with SD models
    takes the longest to start)."""
    from tests.support.controlnet_tiny import add_controlnets
    from tests.support.sd_tiny import frontend_server

    from .playground_units import add_units

    def add(store: Path) -> None:
        add_controlnets(store)
        add_units(store)

    with frontend_server(tmp_path_factory, add, KDIFF_DEFAULT_MODEL="sd1") as srv:
        yield srv


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    path = chromium_path()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=ARGS, headless=True)
        yield b
        b.close()


class Console:
    """Console errors and uncaught exceptions of a page; `expect_http(422)` allows the browser's own
    "Failed to load resource ... 422" line for a response the step provokes on purpose."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        self.allowed: set[int] = set()
        page.on("console", self._on_console)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))

    def _on_console(self, msg: ConsoleMessage) -> None:
        if msg.type != "error":
            return
        if any(f"status of {s} " in msg.text for s in self.allowed):
            return
        self.errors.append(msg.text)


def _open(browser: Browser, url: str, **context: object) -> tuple[Page, Console]:
    page = browser.new_context(**context).new_page()  # type: ignore[arg-type]
    blocked = confine_to_localhost(page)
    console = Console(page)
    page.goto(f"{url}/")
    expect(page.locator("body")).to_have_attribute("data-ready", "true", timeout=15_000)
    assert not blocked, blocked
    return page, console


def _reply_with(reply: dict):  # type: ignore[no-untyped-def]
    """A route handler that answers with ``reply`` (Playwright passes the request too when asked)."""
    return lambda route: route.fulfill(**reply)


def _png_with(params: dict) -> dict:
    """A file for set_input_files: a small PNG whose `kdiff` chunk carries ``params``."""
    import io

    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("kdiff", json.dumps(params))
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG", pnginfo=info)
    return {"name": "made.png", "mimeType": "image/png", "buffer": buf.getvalue()}


def _generate_digit(page: Page, label: str = "7") -> None:
    page.select_option("#class_label", label)
    page.fill("#steps", "6")
    page.fill("#seed", "1")
    page.click("#generate")
    expect(page.locator("#results figure img")).to_have_count(1, timeout=20_000)
    expect(page.locator("#status")).to_contain_text("Done")


def test_playground(browser: Browser, server: Server) -> None:
    out = artifacts()
    t0 = time.perf_counter()
    page, console = _open(browser, server.url, viewport={"width": 1280, "height": 900})
    ready_s = time.perf_counter() - t0
    # the form comes from the API: every sampler is listed, with its options as controls
    n_samplers = len(page.locator("#sampler option").all())
    assert n_samplers >= 30
    page.select_option("#sampler", "euler_ancestral")
    expect(page.locator("#sampler-eta")).to_have_value("1")
    assert page.locator("#sampler-eta").get_attribute("max") == "10"
    page.select_option("#sampler", "euler")
    # the project UNet caches steps (DeepCache); a store without IP-Adapters has no IP-Adapter section
    assert page.locator("#cache_method option").all_text_contents() == ["off", "deepcache"]
    expect(page.locator("#ip-box")).to_be_hidden()

    _generate_digit(page)
    params = json.loads(page.locator("#results pre").first.text_content() or "{}")
    assert params["class_label"] == 7 and params["seed"] == 1 and params["steps"] == 6
    assert page.locator("#results a[download]").count() == 1
    page.screenshot(path=str(out / "generate.png"), full_page=True)

    # loading one of our PNGs restores its parameters (the `kdiff` text chunk)
    src = page.locator("#results img").first.get_attribute("src") or ""
    png = base64.b64decode(src.split(",", 1)[1])
    page.fill("#steps", "3")
    page.fill("#seed", "99")
    page.set_input_files("#load-png", {"name": "seven.png", "mimeType": "image/png", "buffer": png})
    expect(page.locator("#banner")).to_contain_text("restored")
    expect(page.locator("#steps")).to_have_value("6")
    expect(page.locator("#seed")).to_have_value("1")

    # img2img with a painted mask: the start image is the PNG just made, the mask covers all of it
    page.set_input_files("#init_image", {"name": "seven.png", "mimeType": "image/png", "buffer": png})
    expect(page.locator("#mask")).to_be_visible()
    page.click("#mask-all")
    page.fill("#denoise", "0.5")
    page.click("#generate")
    expect(page.locator("#results pre").first).to_contain_text('"inpaint": true', timeout=20_000)
    params = json.loads(page.locator("#results pre").first.text_content() or "{}")
    assert params["img2img"] and params["inpaint"] and params["denoise"] == 0.5, params
    page.click("#init-clear")

    # a long job: progress shows, then Cancel stops it
    page.fill("#steps", str(LONG))
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("Step", timeout=15_000)
    expect(page.locator("#cancel")).to_be_enabled()
    page.click("#cancel")
    expect(page.locator("#status")).to_have_text("Cancelled.", timeout=15_000)
    expect(page.locator("#generate")).to_be_enabled()

    # a bad value: the API's 422 is shown next to the field it names
    console.allowed.add(422)
    page.fill("#steps", "0")
    page.click("#generate")
    expect(page.locator("#err-steps")).to_contain_text("greater than or equal to 1")
    expect(page.locator("#steps")).to_have_attribute("aria-invalid", "true")
    page.screenshot(path=str(out / "field-error.png"), full_page=True)
    # a full queue (429) and a draining service (503) are banners with the Retry-After the API sent
    console.allowed |= {429, 503}
    for status, text in ((429, "queue is full: try again in 7 s"), (503, "shutting down (503)")):
        reply = {"status": status, "body": json.dumps({"detail": "busy"}), "headers": {"Retry-After": "7"}}
        page.route("**/jobs", _reply_with(reply))
        page.click("#generate")
        expect(page.locator("#banner")).to_contain_text(text)
        page.unroute("**/jobs")
    console.allowed.clear()
    page.fill("#steps", "6")

    # a 2x2 comparison grid: both samplers x two step counts, same seed, submitted at once
    page.select_option("#cmp-samplers", ["euler", "heun"])
    page.select_option("#cmp-axis", "steps")
    page.fill("#cmp-values", "20, 40")
    page.click("#cmp-run")
    expect(page.locator("#cmp-grid td img")).to_have_count(4, timeout=30_000)
    summary = page.locator("#cmp-summary")
    expect(summary).to_contain_text("total wall time")
    wall, cells = (
        float(summary.get_attribute("data-wall-s") or 0),
        float(summary.get_attribute("data-sum-s") or 0),
    )
    assert 0 < wall and 0 < cells
    page.locator("#compare").screenshot(path=str(out / "compare.png"))
    page.screenshot(path=str(out / "playground.png"), full_page=True)

    # first load as a new visitor: bytes of the page's own files and time to a usable form
    fresh = browser.new_context().new_page()
    sizes: dict[str, int] = {}
    fresh.on("response", lambda r: sizes.__setitem__(r.url, len(r.body())) if r.ok else None)
    t0 = time.perf_counter()
    fresh.goto(f"{server.url}/")
    expect(fresh.locator("body")).to_have_attribute("data-ready", "true")
    first_load_s = time.perf_counter() - t0
    nav = fresh.evaluate("JSON.stringify(performance.getEntriesByType('navigation')[0].toJSON())")
    page_bytes = sum(v for k, v in sizes.items() if "/playground/" in k or k.endswith("/"))
    # phone width: nothing wider than the screen
    fresh.set_viewport_size({"width": 390, "height": 844})
    assert fresh.evaluate("document.documentElement.scrollWidth") <= 390
    fresh.screenshot(path=str(out / "phone.png"), full_page=True)
    fresh.context.close()

    figures = {
        "page_bytes": page_bytes,
        "files": {k.removeprefix(server.url): v for k, v in sizes.items()},
        "first_load_s": round(first_load_s, 3),
        "load_event_ms": round(json.loads(nav)["loadEventEnd"], 1),
        "first_visit_ready_s": round(ready_s, 3),
        "grid_wall_s": wall,
        "grid_sum_of_cells_s": cells,
    }
    (out / "figures.json").write_text(json.dumps(figures, indent=1))
    print("\nplayground figures:", json.dumps(figures))
    assert console.errors == [], console.errors
    page.context.close()


def test_docs_render_offline(browser: Browser, server: Server) -> None:
    page = browser.new_context().new_page()
    blocked = confine_to_localhost(page)
    console = Console(page)
    page.goto(f"{server.url}/docs")
    expect(page.locator(".opblock").first).to_be_visible(timeout=15_000)
    assert page.locator(".opblock").count() >= 10  # the operations are listed
    expect(page.locator(".opblock-summary-path", has_text="/jobs/{job_id}/events")).to_have_count(1)
    page.screenshot(path=str(artifacts() / "docs.png"))
    page.goto(f"{server.url}/redoc")
    expect(page.get_by_text("/jobs/{job_id}/events").first).to_be_attached(timeout=15_000)
    assert blocked == [], f"the docs asked for non-local URLs: {blocked}"
    assert console.errors == [], console.errors
    page.context.close()


def test_playground_with_api_key(browser: Browser, store: Path, tmp_path: Path) -> None:
    srv = _server(store, tmp_path / "server.log", KDIFF_API_KEYS="s3cret")
    try:
        page = browser.new_context().new_page()
        blocked = confine_to_localhost(page)
        console = Console(page)
        console.allowed.add(401)  # the catalogue, asked for before the key is typed
        page.goto(f"{srv.url}/")
        expect(page.locator("#banner")).to_contain_text("API key")
        page.fill("#api-key", "s3cret")
        page.press("#api-key", "Tab")  # the change event stores the key and reloads the catalogue
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        expect(page.locator("#banner")).to_be_hidden()
        console.allowed.clear()
        _generate_digit(page, "3")  # the job and its event stream carry the key
        page.reload()  # the key is kept in localStorage
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        expect(page.locator("#api-key")).to_have_value("s3cret")
        page.screenshot(path=str(artifacts() / "with-key.png"), full_page=True)
        assert blocked == [] and console.errors == [], (blocked, console.errors)
        page.context.close()
    finally:
        srv.stop()


@pytest.mark.timeout(300)  # starts the server with a Stable Diffusion model
def test_playground_hires_fix(browser: Browser, sd_server: Server) -> None:
    """The hires section on a text model (a tiny SD 1.x): the image comes back at the hires size with
    the hires parameters, loading its PNG restores them, an over-limit size is the section's error;
    the section is hidden for a model of one size (digits)."""
    srv = sd_server
    page, console = _open(browser, srv.url, viewport={"width": 1280, "height": 1400})
    page.select_option("#model", "digits")
    expect(page.locator("#hires-box")).to_be_hidden()
    page.select_option("#model", "sd1")
    expect(page.locator("#hires-box")).to_be_visible()
    page.fill("#prompt", "a red cat")
    for field, value in (("#width", "64"), ("#height", "64"), ("#steps", "3"), ("#seed", "4")):
        page.fill(field, value)
    page.check("#hires_on")
    page.select_option("#hires_upscaler", "Latent (bicubic)")
    page.fill("#hires_steps", "2")
    page.click("#generate")
    expect(page.locator("#results figure img")).to_have_count(1, timeout=60_000)
    size = page.locator("#results figure img").first.evaluate("i => [i.naturalWidth, i.naturalHeight]")
    assert size == [128, 128]
    params = json.loads(page.locator("#results pre").first.text_content() or "{}")
    assert params["hires"]["upscaler"] == "Latent (bicubic)" and params["hires"]["steps"] == 2
    page.screenshot(path=str(artifacts() / "hires.png"), full_page=True)
    src = page.locator("#results img").first.get_attribute("src") or ""
    page.uncheck("#hires_on")
    page.select_option("#hires_upscaler", "Nearest")
    png = base64.b64decode(src.split(",", 1)[1])
    page.set_input_files("#load-png", {"name": "cat.png", "mimeType": "image/png", "buffer": png})
    expect(page.locator("#banner")).to_contain_text("restored")
    expect(page.locator("#hires_on")).to_be_checked()
    expect(page.locator("#hires_upscaler")).to_have_value("Latent (bicubic)")
    console.allowed.add(422)
    page.fill("#hires_scale", "4")  # 256 > the tiny model's max_size 128
    page.click("#generate")
    expect(page.locator("#err-hires")).to_contain_text("limit of 128")
    assert not console.errors, console.errors


def _section(browser: Browser, server: Server, check: Callable[[Page, Console, Server], None]) -> None:
    """A section's ``check`` on a freshly loaded page (tall, so full-page shots show the section); no
    console errors after it."""
    page, console = _open(browser, server.url, viewport={"width": 1280, "height": 1800})
    check(page, console, server)
    assert not console.errors, console.errors
    page.context.close()


@pytest.mark.timeout(300)  # may start the server with a Stable Diffusion model
def test_playground_controlnet(browser: Browser, sd_server: Server) -> None:
    """The ControlNet section (playground_controlnet.py): preview, generate, field errors."""
    from .playground_controlnet import check_controlnet_section

    _section(browser, sd_server, check_controlnet_section)


@pytest.mark.timeout(300)  # may start the server with a Stable Diffusion model
def test_playground_union_ip_adapter_cache(browser: Browser, sd_server: Server) -> None:
    """ControlNet-Union's control type, the IP-Adapter section, the step cache (playground_units.py)."""
    from .playground_units import check_units

    _section(browser, sd_server, check_units)


def test_playground_option_bounds(browser: Browser, server: Server) -> None:
    """An option with no upper bound (euler's s_tmax: the catalogue's maximum is null) reads
    ">= min", never "0 to null", and its input has no max."""
    page, console = _open(browser, server.url)
    page.select_option("#sampler", "euler")
    expect(page.locator("#sampler-options")).not_to_contain_text("null")
    assert page.locator("#sampler-s_tmax").get_attribute("max") is None
    expect(page.locator("#sampler-options")).to_contain_text(">= 0")
    assert not console.errors, console.errors
    page.context.close()


def test_playground_restore_unconditional(browser: Browser, server: Server) -> None:
    """A PNG of an unconditional sample (class_label null) restores "none", not the class picked before."""
    page, console = _open(browser, server.url)
    page.select_option("#class_label", "3")
    page.set_input_files("#load-png", _png_with({"model": "digits", "class_label": None, "steps": 5}))
    expect(page.locator("#banner")).to_contain_text("restored")
    expect(page.locator("#steps")).to_have_value("5")
    expect(page.locator("#class_label")).to_have_value("")
    assert not console.errors, console.errors
    page.context.close()


@pytest.mark.timeout(300)  # may start the server with a Stable Diffusion model
def test_playground_sizes(browser: Browser, sd_server: Server) -> None:
    """A PNG's width and height are restored (the model's default size is not kept); the size inputs
    and the hires scale stop at the model's max_size (GET /models). Ctrl+Enter in the prompt generates."""
    page, console = _open(browser, sd_server.url)
    page.select_option("#model", "sd1")
    assert page.locator("#width").get_attribute("max") == "128"  # the tiny model's max_size
    assert page.locator("#height").get_attribute("max") == "128"
    assert page.locator("#hires_scale").get_attribute("max") == "2"  # 64 x 2 = 128
    page.fill("#width", "32")
    page.fill("#height", "32")
    assert page.locator("#hires_scale").get_attribute("max") == "4"
    page.set_input_files("#load-png", _png_with({"model": "sd1", "width": 96, "height": 48}))
    expect(page.locator("#banner")).to_contain_text("restored")
    expect(page.locator("#width")).to_have_value("96")
    expect(page.locator("#height")).to_have_value("48")
    # Ctrl+Enter in the prompt generates (A1111's web UI's key; Enter there is a new line)
    page.fill("#prompt", "a cat")
    page.fill("#steps", "2")
    page.press("#prompt", "Control+Enter")
    expect(page.locator("#results figure img")).to_have_count(1, timeout=60_000)
    expect(page.locator("#prompt")).to_have_value("a cat")
    assert not console.errors, console.errors
    page.context.close()


def test_playground_start_image_not_an_image(browser: Browser, server: Server) -> None:
    """A start image is judged by the service's image gate, not by whether the browser can draw it:
    a file the browser cannot show is sent as it is (was: dropped with the page's own "not an image",
    and the job quietly ran as text-to-image), one it shows but the service refuses (BMP) too; each
    time the gate's words show next to the field, and the previous image is never what is sent."""
    from PIL import Image

    from tests.support.hostile_images import encoded

    page, console = _open(browser, server.url)
    console.allowed.add(422)
    page.fill("#steps", "3")
    page.set_input_files("#init_image", _png_with({}))
    expect(page.locator("#mask")).to_be_visible()
    text = {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image"}
    page.set_input_files("#init_image", text)
    expect(page.locator("#init-note")).to_contain_text("The browser cannot show notes.txt")
    expect(page.locator("#mask")).to_be_hidden()
    page.click("#generate")
    # 12 bytes starting "not": the text file went to the gate, not the PNG chosen before it
    expect(page.locator("#err-init_image")).to_contain_text(
        "not a PNG, JPEG or WebP image (12 bytes, starting 6e 6f 74"
    )
    expect(page.locator("#status")).to_have_text("Not run.")
    # the message names the formats: not repeated as "(allowed: PNG, JPEG, WebP)"
    expect(page.locator("#err-init_image")).not_to_contain_text("allowed:")
    bmp = {"name": "scan.bmp", "mimeType": "image/bmp", "buffer": encoded(Image.new("RGB", (16, 16)), "BMP")}
    page.set_input_files("#init_image", bmp)
    expect(page.locator("#mask")).to_be_visible()
    expect(page.locator("#err-init_image")).to_be_hidden()  # the last file's error went with it
    page.click("#generate")
    expect(page.locator("#err-init_image")).to_contain_text("starting 42 4d")  # "BM"
    page.click("#init-clear")
    console.allowed.clear()
    _generate_digit(page)
    params = json.loads(page.locator("#results pre").first.text_content() or "{}")
    assert not params.get("img2img"), params
    assert not console.errors, console.errors
    page.context.close()


@pytest.mark.timeout(300)  # may start the server with a Stable Diffusion model
def test_playground_no_controlnets(browser: Browser, sd_server: Server) -> None:
    """A store without ControlNets (the server's control types answered with none): a control image
    leaves the section off and disabled, and Generate sends no unit (was model "", a 422)."""
    page = browser.new_context(viewport={"width": 1280, "height": 1400}).new_page()
    confine_to_localhost(page)
    console = Console(page)

    def no_controlnets(route) -> None:  # type: ignore[no-untyped-def]
        body = route.fetch().json()
        for t in body["control_types"].values():
            t["model_list"] = ["None"]
        route.fulfill(json=body)

    page.route("**/controlnet/control_types", no_controlnets)
    page.goto(f"{sd_server.url}/")
    expect(page.locator("body")).to_have_attribute("data-ready", "true", timeout=15_000)
    page.select_option("#model", "sd1")
    expect(page.locator("#cn-none")).to_be_visible()
    expect(page.locator("#cn_on")).to_be_disabled()
    page.set_input_files("#cn_image", _png_with({}))
    page.wait_for_timeout(300)
    expect(page.locator("#cn_on")).not_to_be_checked()
    sent: list[dict] = []
    jobs = lambda r: r.method == "POST" and r.url.endswith("/jobs")  # noqa: E731
    page.on("request", lambda r: jobs(r) and sent.append(r.post_data_json))
    page.fill("#prompt", "a cat")
    page.fill("#steps", "2")
    page.click("#generate")
    expect(page.locator("#results figure img")).to_have_count(1, timeout=60_000)
    assert sent and "controlnets" not in sent[0], sent
    assert not console.errors, console.errors
    page.context.close()


def test_playground_schedules_for_model(browser: Browser, server: Server) -> None:
    """The schedule list offers only what the model runs: the tiny UNet is continuous-time (GET /models:
    discrete false), so the schedules that need a discrete-time model (GET /schedules: needs_discrete)
    are not listed."""
    page, console = _open(browser, server.url)
    (tiny,) = page.request.get(f"{server.url}/models").json()["models"]  # a digits-like UNet
    assert tiny["discrete"] is False, tiny
    schedules = page.request.get(f"{server.url}/schedules").json()["schedules"]
    refused = {s["name"] for s in schedules if s["needs_discrete"]}
    assert {"normal", "simple", "sgm_uniform", "ddim_uniform"} <= refused
    offered = set(page.locator("#schedule option").all_text_contents())
    assert offered and not offered & refused, offered & refused
    assert "karras" in offered
    assert not console.errors, console.errors
    page.context.close()


def test_playground_cancel_while_submitting(browser: Browser, server: Server) -> None:
    """Cancel before the job's id is back ("Submitting..."): once the id arrives the job is deleted,
    it does not run to its end."""
    page, console = _open(browser, server.url)
    held: list = []
    hold = lambda route: held.append(route) if route.request.method == "POST" else route.continue_()  # noqa: E731
    page.route("**/jobs", hold)
    page.fill("#steps", str(LONG))
    page.click("#generate")
    expect(page.locator("#status")).to_have_text("Submitting...")
    page.wait_for_timeout(200)
    assert held, "the POST /jobs was not held"
    deletes: list[str] = []
    page.on("request", lambda r: r.method == "DELETE" and deletes.append(r.url))
    page.click("#cancel")
    held[0].continue_()
    expect(page.locator("#status")).to_have_text("Cancelled.", timeout=15_000)
    expect(page.locator("#generate")).to_be_enabled()
    assert len(deletes) == 1, deletes
    job = page.request.get(deletes[0]).json()
    assert job["status"] == "cancelled", job
    page.unroute("**/jobs")
    assert not console.errors, console.errors
    page.context.close()


def test_playground_compare_schedules(browser: Browser, server: Server) -> None:
    """Varying the schedule in the comparison grid offers only the schedules the model runs (the form's
    list: no needs_discrete one for a continuous-time model, no `tuned` without tuned schedules), not
    a free text that let a refused one through to a 422 cell."""
    page, console = _open(browser, server.url)
    page.select_option("#cmp-axis", "schedule")
    expect(page.locator("#cmp-values")).to_be_hidden()
    offered = page.locator("#cmp-schedules option").all_text_contents()
    assert offered == page.locator("#schedule option").all_text_contents()
    assert "karras" in offered and not {"normal", "simple", "tuned"} & set(offered), offered
    page.select_option("#cmp-samplers", ["euler"])
    page.click("#cmp-run")
    expect(page.locator('[data-for="cmp"]')).to_contain_text("pick 1 to 4 schedules")
    page.select_option("#cmp-schedules", ["karras", "exponential"])
    page.fill("#steps", "4")
    page.click("#cmp-run")
    expect(page.locator("#cmp-grid td img")).to_have_count(2, timeout=20_000)
    shown = [json.loads(t)["schedule"] for t in page.locator("#cmp-grid pre").all_text_contents()]
    assert shown == ["karras", "exponential"], shown
    assert not console.errors, console.errors
    page.context.close()


def test_playground_waits_for_catalogue(browser: Browser, server: Server) -> None:
    """A slow service: until the model list is in, Generate and Run comparison are disabled and the
    status says what the page waits for (Generate used to throw an uncaught TypeError, showing nothing)."""
    page = browser.new_context().new_page()
    confine_to_localhost(page)
    console = Console(page)
    held: list = []
    page.route("**/schedules", lambda route: held.append(route))
    page.goto(f"{server.url}/")
    expect(page.locator("#status")).to_contain_text("Loading the list of models")
    expect(page.locator("#generate")).to_be_disabled()
    expect(page.locator("#cmp-run")).to_be_disabled()
    page.wait_for_timeout(100)
    held[0].continue_()
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(page.locator("#generate")).to_be_enabled()
    expect(page.locator("#status")).to_have_text("Ready.")
    _generate_digit(page)
    assert not console.errors, console.errors
    page.context.close()


def _drops(errors: list[str]) -> list[str]:
    """Console errors less the browser's own lines for the connections a test resets or refuses."""
    dropped = ("ERR_CONNECTION_RESET", "ERR_CONNECTION_REFUSED", "ERR_INCOMPLETE_CHUNKED_ENCODING")
    return [e for e in errors if not any(d in e for d in dropped)]


def test_playground_reconnects(browser: Browser, server: Server) -> None:
    """The event stream is reset mid-job (a real TCP reset, through a proxy), then another ends early:
    each time the page reconnects and shows the image (it used to say "Not run." for a job that ran).
    With the service unreachable, Cancel stops the waiting and says the job could not be cancelled."""
    from .cut_proxy import CutProxy
    from .playground_reconnect import (
        check_cancel_while_unreachable,
        check_cut_stream,
        check_stream_ends_early,
    )

    proxy = CutProxy(server.port)
    try:
        page, console = _open(browser, proxy.url)
        check_cut_stream(page, proxy)
        check_stream_ends_early(page)
        check_cancel_while_unreachable(page, proxy, server.url, LONG)
        assert not _drops(console.errors), console.errors
        page.context.close()
    finally:
        proxy.close()


def test_playground_service_restart(browser: Browser, server: Server, store: Path, tmp_path: Path) -> None:
    """The service is killed mid-job and started again (the module's server, on its port): without a
    job store the page says plainly that the job is gone; with one the job reruns and the page shows
    the image."""
    from .playground_reconnect import check_restart

    check_restart(browser, server, store, tmp_path, LONG)


# A1111 1.10's infotext as it writes it (modules/processing.py create_infotext): prompt, negative
# prompt, then "Key: value" pairs; hires fields when the hires fix ran.
A1111_INFOTEXT = (
    "a red cat, best quality\nNegative prompt: blurry, lowres\n"
    "Steps: 23, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 64x96, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, "
    'Lora hashes: "a: 1, b: 2", '
    "Hires upscale: 1.5, Hires steps: 3, Hires upscaler: Latent (bicubic), Version: v1.10.1"
)


def _file(name: str, data: bytes, mime: str = "image/png") -> dict:
    return {"name": name, "mimeType": mime, "buffer": data}


@pytest.mark.timeout(300)  # may start the server with a Stable Diffusion model
def test_playground_png_info(browser: Browser, sd_server: Server) -> None:
    """Parameters from A1111's images (PNG `parameters` chunk; JPEG EXIF UserComment; the older
    "DPM++ 2M Karras" sampler spelling) are restored with A1111's names turned into ours (sampler,
    schedule, size, hires; they were left as they were, only steps/CFG/seed read). A choice the model
    does not offer is named, not set to a blank select. Every image is read by the service through
    its image gate: one over the pixel limit gets the gate's words."""
    from PIL import Image

    from tests.support.hostile_images import a1111_jpeg, encoded

    page, console = _open(browser, sd_server.url, viewport={"width": 1280, "height": 1400})
    page.select_option("#model", "sd1")
    info = _info(A1111_INFOTEXT)
    png = encoded(Image.new("RGB", (64, 96)), "PNG", pnginfo=info)
    page.set_input_files("#load-png", _file("00001-1234.png", png))
    expect(page.locator("#banner")).to_contain_text("Parameters restored from 00001-1234.png")
    expect(page.locator("#banner")).to_contain_text("model v1-5-pruned-emaonly")  # not in this store
    expected = {
        "sampler": "dpmpp_2m",
        "schedule": "karras",
        "steps": "23",
        "cfg_scale": "6.5",
        "seed": "1234",
    }
    expected |= {"width": "64", "height": "96", "prompt": "a red cat, best quality"}
    expected |= {"negative_prompt": "blurry, lowres", "hires_scale": "1.5", "hires_steps": "3"}
    expected |= {"hires_upscaler": "Latent (bicubic)", "hires_denoise": "0.45"}
    for field, value in expected.items():
        expect(page.locator(f"#{field}")).to_have_value(value)
    expect(page.locator("#hires_on")).to_be_checked()

    old = A1111_INFOTEXT.replace("Sampler: DPM++ 2M, Schedule type: Karras", "Sampler: Euler a Karras")
    old = old.replace("Hires upscaler: Latent (bicubic)", "Hires upscaler: 4x-UltraSharp")
    page.set_input_files("#load-png", _file("old.jpg", a1111_jpeg(old), "image/jpeg"))
    expect(page.locator("#banner")).to_contain_text("hires upscaler 4x-UltraSharp")
    expect(page.locator("#sampler")).to_have_value("euler_ancestral")
    expect(page.locator("#schedule")).to_have_value("karras")
    expect(page.locator("#hires_upscaler")).to_have_value("Latent (bicubic)")  # kept, not blank

    # a continuous-time model does not run A1111's "Uniform" (our normal): named, the select not blank
    page.select_option("#model", "digits")
    uniform = A1111_INFOTEXT.replace("Schedule type: Karras", "Schedule type: Uniform")
    small = encoded(Image.new("RGB", (8, 8)), "PNG", pnginfo=_info(uniform))
    page.set_input_files("#load-png", _file("u.png", small))
    expect(page.locator("#banner")).to_contain_text("schedule normal")
    assert page.locator("#schedule").input_value() in page.locator("#schedule option").all_text_contents()

    console.allowed.add(422)
    big = encoded(Image.new("L", (4100, 4100)), "PNG", pnginfo=info)  # over 4096 x 4096 pixels
    page.set_input_files("#load-png", _file("huge.png", big))
    expect(page.locator("#banner")).to_contain_text("Cannot read huge.png: ")
    expect(page.locator("#banner")).to_contain_text("4100x4100")
    page.set_input_files("#load-png", _file("notes.png", b"not an image at all"))
    expect(page.locator("#banner")).to_contain_text("not a PNG, JPEG or WebP image")
    assert not console.errors, console.errors
    page.context.close()


def _info(text: str):  # type: ignore[no-untyped-def]
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    return info


@pytest.mark.timeout(300)  # may start the server with a Stable Diffusion model
def test_playground_phone_widths(browser: Browser, sd_server: Server) -> None:
    """At phone widths (320 px: iPhone SE 1st gen, small Androids; 360 px) nothing is wider than the
    screen, for a class model and for an SD model with every section shown (the file inputs' own
    width and a fieldset's min-content width scrolled the page sideways)."""
    page, console = _open(browser, sd_server.url, viewport={"width": 320, "height": 700})
    for model, width in (("digits", 320), ("sd1", 320), ("sd1", 360)):
        page.select_option("#model", model)
        page.set_viewport_size({"width": width, "height": 700})
        wide = page.evaluate(
            """w => [...document.querySelectorAll('body *')]
                .filter((e) => e.getBoundingClientRect().right > w + 0.5)
                .map((e) => `${e.tagName}#${e.id}`)""",
            width,
        )
        assert page.evaluate("document.documentElement.scrollWidth") <= width, (model, width, wide)
    assert not console.errors, console.errors
    page.context.close()


def test_playground_model_not_loaded(browser: Browser, server: Server) -> None:
    """The page opened while its model is unloaded (GET /models has no size, conditioning or
    discrete for it): the form says so (was "undefinedxundefined, undefined"), its first job loads
    it, and then the form shows the model's classes, size and schedules."""
    page = browser.new_context().new_page()
    assert page.request.post(f"{server.url}/models/tiny/unload").ok
    page.goto(f"{server.url}/")
    expect(page.locator("body")).to_have_attribute("data-ready", "true", timeout=15_000)
    console = Console(page)
    expect(page.locator("#model-doc")).to_contain_text("not loaded (on_disk)")
    expect(page.locator("#model-doc")).not_to_contain_text("undefined")
    page.fill("#steps", "5")
    page.fill("#seed", "2")
    page.click("#generate")
    expect(page.locator("#results figure img")).to_have_count(1, timeout=20_000)
    expect(page.locator("#model-doc")).to_have_text("tiny random-weight test model: 8x8, class")
    expect(page.locator("#class-row")).to_be_visible()
    expect(page.locator("#steps")).to_have_value("5")  # the user's values are kept
    expect(page.locator("#seed")).to_have_value("2")
    assert "normal" not in page.locator("#schedule option").all_text_contents()  # discrete is known now
    assert not console.errors, console.errors
    page.context.close()


def test_playground_comes_back(browser: Browser, server: Server) -> None:
    """Back from a link, the tab shows the form and images it had (they were gone: a fresh form);
    reloaded while a job runs, it follows the job again and shows its image (it said "Ready." while
    the job ran on). Another tab keeps its own."""
    page, console = _open(browser, server.url)
    page.select_option("#class_label", "4")
    _generate_digit(page, "4")
    page.click("text=API docs")
    page.wait_for_url("**/docs", wait_until="commit")
    page.go_back()
    expect(page.locator("#results figure img")).to_have_count(1, timeout=10_000)
    expect(page.locator("#steps")).to_have_value("6")
    expect(page.locator("#class_label")).to_have_value("4")
    page.fill("#steps", "800")
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("Step", timeout=15_000)
    page.reload()  # the job runs on, or ended meanwhile: either way its image comes back
    expect(page.locator("#status")).to_contain_text("Done", timeout=20_000)
    params = json.loads(page.locator("#results pre").first.text_content() or "{}")
    assert params["steps"] == 800 and params["class_label"] == 4, params
    other = page.context.new_page()
    other.goto(f"{server.url}/")
    expect(other.locator("body")).to_have_attribute("data-ready", "true")
    expect(other.locator("#steps")).to_have_value("4")  # the model's default, not the first tab's
    assert other.locator("#results figure").count() == 0
    assert not console.errors, console.errors
    page.context.close()


def test_playground_keyboard(browser: Browser, server: Server) -> None:
    """Without a pointer: Enter in a field generates, Escape cancels the running job, Enter in the
    comparison's values runs the grid (it did nothing: the grid is outside the form)."""
    page, console = _open(browser, server.url)
    page.fill("#steps", str(LONG))
    page.press("#steps", "Enter")
    expect(page.locator("#status")).to_contain_text("Step", timeout=15_000)
    page.keyboard.press("Escape")
    expect(page.locator("#status")).to_have_text("Cancelled.", timeout=15_000)
    page.fill("#steps", "4")
    page.select_option("#cmp-samplers", ["euler"])
    page.fill("#cmp-values", "3, 4")
    page.press("#cmp-values", "Enter")
    expect(page.locator("#cmp-grid td img")).to_have_count(2, timeout=20_000)
    assert not console.errors, console.errors
    page.context.close()


def test_playground_cancel_comparison(browser: Browser, server: Server) -> None:
    """A comparison grid of long jobs can be cancelled (there was no way: its jobs ran on after the
    page was closed): each cell's job is deleted on the service and the cell says so."""
    page, console = _open(browser, server.url)
    page.fill("#steps", str(LONG))
    page.select_option("#cmp-samplers", ["euler", "heun"])
    page.select_option("#cmp-axis", "cfg_scale")
    page.fill("#cmp-values", "1, 2")
    page.click("#cmp-run")
    expect(page.locator("#cmp-grid td", has_text="step")).to_have_count(4, timeout=15_000)
    page.click("#cmp-cancel")
    expect(page.locator("#cmp-grid td", has_text="cancelled")).to_have_count(4, timeout=15_000)
    expect(page.locator("#cmp-summary")).to_contain_text("Cancelled: 0 of 4 cells finished.")
    expect(page.locator("#cmp-run")).to_be_enabled()
    jobs = page.request.get(f"{server.url}/jobs?limit=4").json()
    assert [j["status"] for j in jobs] == ["cancelled"] * 4, jobs
    assert not console.errors, console.errors
    page.context.close()


def test_playground_two_tabs_and_drop(browser: Browser, server: Server) -> None:
    """Two tabs: a key typed in one shows in the other (whose requests already send it: it is one
    localStorage; its field showed the old key); the catalogue the key reloads keeps the form's
    values (they were reset to the model's defaults); each tab runs its own job at once. An A1111 PNG dropped
    on the page (not chosen with the file button) restores its parameters."""
    page, console = _open(browser, server.url)
    other = page.context.new_page()
    other.goto(f"{server.url}/")
    expect(other.locator("body")).to_have_attribute("data-ready", "true")
    page.fill("#steps", "100")
    page.select_option("#sampler", "heun")
    page.fill("#api-key", "k1")
    with page.expect_response("**/schedules"):  # the key reloads the catalogue...
        page.press("#api-key", "Tab")
    page.wait_for_timeout(100)
    expect(page.locator("#steps")).to_have_value("100")  # ...and the form keeps its values (was reset)
    expect(page.locator("#sampler")).to_have_value("heun")
    expect(other.locator("#api-key")).to_have_value("k1")
    page.fill("#api-key", "")
    page.press("#api-key", "Tab")
    expect(other.locator("#api-key")).to_have_value("")
    other.fill("#steps", "5")
    for tab in (page, other):
        tab.click("#generate")
    for tab, steps in ((page, 100), (other, 5)):
        expect(tab.locator("#results figure img")).to_have_count(1, timeout=20_000)
        assert json.loads(tab.locator("#results pre").first.text_content() or "{}")["steps"] == steps

    text = A1111_INFOTEXT.replace("Sampler: DPM++ 2M", "Sampler: Euler a")
    data = base64.b64encode(_encoded_png(text)).decode()
    drop = page.evaluate_handle(
        """([b64, name]) => { const dt = new DataTransfer();
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            dt.items.add(new File([bytes], name, { type: "image/png" }));
            return dt; }""",
        [data, "from-a1111.png"],
    )
    page.dispatch_event("#results", "drop", {"dataTransfer": drop})
    expect(page.locator("#banner")).to_contain_text("Parameters restored from from-a1111.png")
    expect(page.locator("#steps")).to_have_value("23")
    expect(page.locator("#sampler")).to_have_value("euler_ancestral")
    assert not console.errors, console.errors
    page.context.close()


def _encoded_png(infotext: str) -> bytes:
    from PIL import Image

    from tests.support.hostile_images import encoded

    return encoded(Image.new("RGB", (8, 8)), "PNG", pnginfo=_info(infotext))

"""The playground when its connection to the service drops mid-job (test_playground.py runs these).

The job goes on running on the service: the page must reconnect (GET /jobs/{id}, then the event
stream again, with backoff) and show the image; it says the job is gone only when the service
answers 404 for it.
"""

from __future__ import annotations

import json
from pathlib import Path

from playwright.sync_api import Browser, Page, expect

from tests.support.server import Server

from .cut_proxy import CutProxy

RUNNING = 800  # steps of a job that runs 1-3 s on the tiny model: still running when it is cut
IMAGE = "#results figure img"


def _start_job(page: Page, steps: int) -> list[str]:
    """Generate a digit of ``steps`` steps; wait until it runs. Returns the event streams' URLs asked for."""
    streams: list[str] = []
    page.on("request", lambda r: "/events" in r.url and streams.append(r.url))
    page.fill("#steps", str(steps))
    page.fill("#seed", "5")
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("Step", timeout=15_000)
    return streams


def check_cut_stream(page: Page, proxy: CutProxy) -> None:
    """The page goes through ``proxy``; the connection is reset while the job's events stream."""
    streams = _start_job(page, RUNNING)
    assert proxy.cut() >= 1
    expect(page.locator("#status")).to_contain_text("Reconnecting", timeout=5_000)
    expect(page.locator(IMAGE)).to_have_count(1, timeout=30_000)
    expect(page.locator("#status")).to_contain_text("Done")
    expect(page.locator("#banner")).to_be_hidden()
    assert len(streams) >= 2, streams  # subscribed again after the cut
    params = json.loads(page.locator("#results pre").first.text_content() or "{}")
    assert params["steps"] == RUNNING and params["seed"] == 5, params


def check_stream_ends_early(page: Page) -> None:
    """The event stream ends cleanly without done/error (a proxy's response timeout): the page asks
    for the job and shows its result."""
    cut = []

    def first_ends_early(route) -> None:  # type: ignore[no-untyped-def]
        if cut:
            return route.continue_()
        cut.append(route.request.url)
        queued = 'event: queued\ndata: {"position": 0}\n\n'
        route.fulfill(status=200, content_type="text/event-stream", body=queued)

    page.route("**/events*", first_ends_early)
    page.locator("#results").evaluate("e => e.replaceChildren()")
    page.fill("#steps", "6")
    page.click("#generate")
    expect(page.locator(IMAGE)).to_have_count(1, timeout=20_000)
    expect(page.locator("#status")).to_contain_text("Done")
    assert cut
    page.unroute("**/events*")


def _restart(srv: Server, store: Path, log: Path, **env: str) -> None:
    """Kill ``srv`` (SIGKILL: its streams break, it is unreachable a while) and start it again on the
    same port with ``env``; ``srv`` is the new process afterwards (the module's shared server goes on)."""
    srv.stop()
    new = Server(store, log, port=srv.port, **env)
    new.wait_ready()
    srv.proc, srv._log, srv.log_path = new.proc, new._log, new.log_path


def check_restart(browser: Browser, srv: Server, store: Path, tmp: Path, long_steps: int) -> None:
    """``srv`` (no job store) is killed mid-job and started again: the job is gone, and the open page
    says so (plainly, once), not that it never ran. Started with a job store (KDIFF_STATE_DIR) and
    killed mid-job again: the job runs again there, and the page shows its image."""
    env = {"KDIFF_MAX_STEPS": str(long_steps), "KDIFF_STATE_DIR": str(tmp / "state")}
    page = browser.new_context().new_page()
    try:
        page.goto(f"{srv.url}/")
        expect(page.locator("body")).to_have_attribute("data-ready", "true", timeout=15_000)
        _start_job(page, long_steps)
        _restart(srv, store, tmp / "1.log", **env)
        gone = "is gone: the service no longer has it"
        expect(page.locator("#banner")).to_contain_text(gone, timeout=20_000)
        expect(page.locator("#status")).to_have_text("Lost.")
        expect(page.locator("#generate")).to_be_enabled()

        _start_job(page, RUNNING)
        srv.stop()
        expect(page.locator("#status")).to_contain_text("Reconnecting", timeout=5_000)
        _restart(srv, store, tmp / "2.log", **env)
        expect(page.locator(IMAGE)).to_have_count(1, timeout=40_000)
        expect(page.locator("#status")).to_contain_text("Done")
        expect(page.locator("#banner")).to_be_hidden()
    finally:
        page.context.close()


def check_cancel_while_unreachable(page: Page, proxy: CutProxy, server_url: str, long_steps: int) -> None:
    """The service cannot be reached at all (the proxy stops listening) while the page reconnects:
    Cancel stops the page's waiting and says the job could not be cancelled (it runs on there)."""
    _start_job(page, long_steps)
    proxy.close()
    expect(page.locator("#status")).to_contain_text("Reconnecting", timeout=5_000)
    page.click("#cancel")
    expect(page.locator("#status")).to_contain_text("the service could not be reached to cancel it")
    expect(page.locator("#generate")).to_be_enabled()
    (job,) = page.request.get(f"{server_url}/jobs?limit=1").json()
    assert job["status"] == "running", job
    page.request.delete(f"{server_url}/jobs/{job['id']}")

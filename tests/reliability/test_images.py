"""Hostile images against a live server (issue 23, items 3 and 4): every route that takes an image
refuses a decompression bomb with a 4xx in its API's shape naming the field, before decoding it (the
server's RSS, read with psutil, grows by less than 50 MiB), a large real photo on /v1/images/edits
works, and /healthz stays fast while png-info requests with a hostile text chunk run."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import psutil
import pytest

from tests.support.hostile_images import (
    b64,
    bomb_png,
    encoded,
    jpeg_claiming,
    noisy,
    small_png,
    webp_claiming,
    ztxt_png,
)
from tests.support.server import Server

from .support import AUTH1, crashes

MiB = 2**20


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    return {
        # The issue's: a 12000x12000 one-colour RGB PNG (410 KB; 432 MB once decoded).
        "png": bomb_png(12000, 12000),
        # The png-info case: 20000x20000 (PIL's own bomb check raised, uncaught: a 500).
        "png20k": bomb_png(20000, 20000, colour_type=0),
        "jpeg": jpeg_claiming(12000, 12000),
        "webp": webp_claiming(16000, 16000),
    }


def _rss(server: Server) -> float:
    return float(psutil.Process(server.proc.pid).memory_info().rss) / MiB


def _ours(field: str) -> Callable[[httpx.Response], None]:
    def check(r: httpx.Response) -> None:
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert detail[0]["loc"] == ["body", field] and "pixels" in detail[0]["msg"], detail

    return check


def _a1111(field: str) -> Callable[[httpx.Response], None]:
    def check(r: httpx.Response) -> None:
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["error"] == "FieldError" and body["detail"][0]["loc"] == ["body", field], body
        assert "pixels" in body["errors"], body

    return check


def _openai(param: str) -> Callable[[httpx.Response], None]:
    def check(r: httpx.Response) -> None:
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and err["type"] == "invalid_request_error", err
        assert "pixels" in err["message"], err

    return check


def _routes(bomb: bytes, bomb20k: bytes) -> list[tuple[str, Callable[[httpx.Client], httpx.Response], Any]]:
    """(name, send, check): each route and field that takes an image, fed the bomb."""
    small = small_png((16, 16))
    ours_mask = {"init_image": b64(small), "mask": "data:image/png;base64," + b64(bomb), "denoise": 0.5}
    a1111_init = {"prompt": "a 3", "init_images": [b64(bomb)], "steps": 2}
    a1111_mask = {"prompt": "a 3", "init_images": [b64(small)], "mask": b64(bomb), "steps": 2}
    edit_image = {"image": ("bomb.png", bomb, "image/png")}
    edit_mask = {"image": ("i.png", small, "image/png"), "mask": ("m.png", bomb, "image/png")}
    return [
        ("/sample init_image", lambda c: c.post("/sample", json={"init_image": b64(bomb), "denoise": 0.5}),
         _ours("init_image")),
        ("/sample mask", lambda c: c.post("/sample", json=ours_mask), _ours("mask")),
        ("a1111 img2img init_images", lambda c: c.post("/sdapi/v1/img2img", json=a1111_init),
         _a1111("init_images")),
        ("a1111 img2img mask", lambda c: c.post("/sdapi/v1/img2img", json=a1111_mask), _a1111("mask")),
        ("openai edits image", lambda c: c.post("/v1/images/edits", data={"prompt": "a 3"}, files=edit_image),
         _openai("image")),
        ("openai edits mask", lambda c: c.post("/v1/images/edits", data={"prompt": "a 3"}, files=edit_mask),
         _openai("mask")),
        ("a1111 png-info", lambda c: c.post("/sdapi/v1/png-info", json={"image": b64(bomb20k)}),
         _a1111("image")),
        ("a1111 extra-single-image",
         lambda c: c.post("/sdapi/v1/extra-single-image", json={"image": b64(bomb)}), _a1111("image")),
        ("a1111 extra-batch-images",
         lambda c: c.post("/sdapi/v1/extra-batch-images", json={"imageList": [{"data": b64(bomb)}]}),
         _a1111("imageList.0.data")),
        ("/upscale image", lambda c: c.post("/upscale", json={"image": b64(bomb)}), _ours("image")),
    ]  # fmt: skip


def test_every_image_route_refuses_a_bomb_without_decoding_it(
    server: Server, bombs: dict[str, bytes]
) -> None:
    with httpx.Client(base_url=server.url, headers=AUTH1, timeout=60) as c:
        routes = _routes(bombs["png"], bombs["png20k"])
        cold = _rss(server)
        for _, send, check in routes:  # warm-up: each route's code and buffers once
            check(send(c))
        rss: list[tuple[str, float, float, float]] = []
        for name, send, check in routes:
            before = _rss(server)
            t0 = time.perf_counter()
            for _ in range(3):
                check(send(c))
            rss.append((name, before, _rss(server), (time.perf_counter() - t0) / 3))
        # The same bomb as JPEG and WebP headers (real encoders' files claiming 12000^2 / 16000^2).
        for kind in ("jpeg", "webp"):
            _ours("init_image")(c.post("/sample", json={"init_image": b64(bombs[kind]), "denoise": 0.5}))
            files = {"image": ("x", bombs[kind])}
            _openai("image")(c.post("/v1/images/edits", data={"prompt": "3"}, files=files))
            _a1111("image")(c.post("/sdapi/v1/png-info", json={"image": b64(bombs[kind])}))
        end = _rss(server)
    for name, before, after, seconds in rss:
        grew = after - before
        print(f"{name}: RSS {before:.1f} -> {after:.1f} MiB ({grew:+.1f}), {seconds * 1000:.0f} ms/request")
    print(f"all of it, warm-up included: RSS {cold:.1f} -> {end:.1f} MiB ({end - cold:+.1f})")
    for name, before, after, _ in rss:
        assert after - before < 50, f"{name}: RSS grew {after - before:.1f} MiB"
    assert end - cold < 50
    assert not crashes(server)


def test_a_2600px_photo_works_on_edits(server: Server) -> None:
    """A 2600x2600 JPEG (a phone photo's size; 4.9 MB of noisy pixels) was a 500 on edits: re-encoded
    as base64 PNG it passed the 16 MB limit of our request's init_image. The decoded upload is now
    handed on as it is."""
    photo = encoded(noisy((2600, 2600)), "JPEG", quality=92)
    with httpx.Client(base_url=server.url, headers=AUTH1, timeout=120) as c:
        r = c.post(
            "/v1/images/edits",
            data={"prompt": "a 3", "response_format": "b64_json"},
            files={"image": ("photo.jpg", photo, "image/jpeg")},
        )
        assert r.status_code == 200, r.text
        assert len(r.json()["data"]) == 1 and r.json()["data"][0]["b64_json"]
        # As an A1111 init image and as ours (base64 of the same file) too.
        r = c.post("/sdapi/v1/img2img", json={"prompt": "a 3", "init_images": [b64(photo)], "steps": 2})
        assert r.status_code == 200, r.text
        r = c.post("/sample", json={"init_image": b64(photo), "denoise": 0.5, "steps": 2, "class_label": 3})
        assert r.status_code == 200, r.text
    assert not crashes(server)


def test_healthz_stays_fast_while_hostile_png_info_requests_run(server: Server) -> None:
    """The issue's body: a PNG whose compressed text chunk holds 40,000 'a's (212 bytes as JSON) took
    6.8 s on the event loop (a quadratic parse) and /healthz waited behind it. Four clients send it
    back to back while /healthz is polled for 2-second windows: every probe of a window under 100 ms.
    This machine's 2 cores are shared with other test runs (load 5-11), whose scheduling stalls stop
    the whole server now and then (png-info answers stall at the same moment), so up to 3 windows
    are measured and one must be clean; the old code failed every window by seconds."""
    png = ztxt_png({"parameters": "a" * 40_000})
    body = {"image": b64(png)}
    assert len(httpx.Request("POST", "/", json=body).content) < 260
    stop = threading.Event()
    answered: list[float] = []
    failures: list[str] = []

    def client() -> None:
        with httpx.Client(base_url=server.url, headers=AUTH1, timeout=30) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                r = c.post("/sdapi/v1/png-info", json=body)
                answered.append(time.perf_counter() - t0)
                if r.status_code != 200 or r.json()["parameters"]["Prompt"] != "a" * 40_000:
                    failures.append(r.text[:200])

    def probe_for(seconds: float) -> list[float]:
        out = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            assert probe.get("/healthz").status_code == 200
            out.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.02)
        return out

    threads = [threading.Thread(target=client) for _ in range(4)]
    windows: list[list[float]] = []
    with httpx.Client(base_url=server.url, timeout=30) as probe:
        idle = probe_for(0.5)
        for t in threads:
            t.start()
        try:
            while len(windows) < 3 and (not windows or max(windows[-1]) >= 100):
                count = len(answered)
                windows.append(probe_for(2.0))
                assert len(answered) - count >= 8, "the hostile requests did not run alongside"
        finally:
            stop.set()
            for t in threads:
                t.join(30)
    assert not failures, failures[:3]
    every = sorted(x for w in windows for x in w)
    print(
        f"/healthz idle: max {max(idle):.1f} ms; under 4 hostile png-info clients: "
        + "; ".join(f"window {i + 1}: {len(w)} probes, max {max(w):.1f} ms" for i, w in enumerate(windows))
        + f"; all: median {statistics.median(every):.1f} ms, 95th {every[int(len(every) * 0.95)]:.1f} ms. "
        f"png-info: {len(answered)} answers, median {statistics.median(answered) * 1000:.1f} ms"
    )
    assert max(windows[-1]) < 100, windows
    assert statistics.median(every) < 20

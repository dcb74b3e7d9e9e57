"""Issue 23 item 5's figures against a live server (tiny store, two keys): what the per-caller
/sdapi/v1/options store keeps when a caller posts big or deep values, how /metrics grows under
made-up methods and paths, and whether one key's OpenAI image links outlive another key's burst.

    .venv/bin/python -m bench.bench_frontend_bounds
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import httpx

from tests.reliability.support import AUTH1, AUTH2, rss_mib, start
from tests.support.tiny_store import make_tiny_store


def main() -> None:
    root = make_tiny_store(Path(tempfile.mkdtemp()))
    srv = start(root, Path(tempfile.mkdtemp()) / "server.log")
    try:
        c = httpx.Client(base_url=srv.url, timeout=120)
        c.get("/sdapi/v1/options", headers=AUTH1)
        before = rss_mib(srv.proc.pid)
        big = "x" * 16 * 2**20
        codes = [
            c.post("/sdapi/v1/options", json={f"b{i}": big}, headers=AUTH1).status_code for i in range(4)
        ]
        got = c.get("/sdapi/v1/options", headers=AUTH1)
        print(
            f"options: four 16 MiB values -> {codes}; server RSS {before:.0f} -> "
            f"{rss_mib(srv.proc.pid):.0f} MiB; GET {got.status_code}, {len(got.content)} bytes"
        )
        deep = '{"x": ' + "[" * 400 + "]" * 400 + "}"
        r = c.post("/sdapi/v1/options", content=deep, headers={**AUTH1, "Content-Type": "application/json"})
        print(
            f"options: a value nested 400 deep -> {r.status_code}; "
            f"later GET {c.get('/sdapi/v1/options', headers=AUTH1).status_code}"
        )
        sizes = [len(c.get("/metrics").content)]
        for i in range(150):
            c.request(f"X{i}", "/healthz")
        sizes.append(len(c.get("/metrics").content))
        for i in range(150, 300):
            c.request(f"X{i}", f"/made/up/{i}")
        sizes.append(len(c.get("/metrics").content))
        print(
            "metrics: {:.1f} KiB, after 150 made-up methods {:.1f} KiB, after 150 more on made-up "
            "paths {:.1f} KiB".format(*(s / 1024 for s in sizes))
        )
        body = {"prompt": "a 7", "steps": 1, "response_format": "url"}
        url = c.post("/v1/images/generations", json=body, headers=AUTH1).json()["data"][0]["url"]
        t0 = time.monotonic()
        for _ in range(33):
            c.post("/v1/images/generations", json={**body, "n": 16}, headers=AUTH2).raise_for_status()
        print(
            f"links: key B's 33 requests of n=16 in {time.monotonic() - t0:.1f} s; "
            f"key A's link -> {c.get(url).status_code}"
        )
    finally:
        srv.stop()


if __name__ == "__main__":
    main()

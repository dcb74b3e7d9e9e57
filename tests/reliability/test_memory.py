"""Steady load with the result store full: the server's memory stays flat (kept results are encoded
bytes, bounded in count and size; nothing of a finished job pins tensors)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator

import httpx
import pytest

from service.api.malloc import TRIM_EVERY_S
from tests.support.server import Server
from tests.support.tiny_store import make_tiny_store

from .support import AUTH1, SOAK, crashes, rss_mib, start

ROUNDS = 9 if SOAK else 4  # rounds of 1,000 requests
KEPT = 500  # KDIFF_MAX_RESULTS: full after the first 500 kept results


@pytest.fixture(scope="module")
def small_store_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # 3x32x32 images: a batched model output is big enough that a finished job pinning one shows
    store = make_tiny_store(tmp_path_factory.mktemp("rss-store"), image_size=32, channels=3)
    srv = start(store, tmp_path_factory.mktemp("rss") / "server.log", KDIFF_MAX_RESULTS=str(KEPT))
    try:
        yield srv
    finally:
        srv.stop()


async def load_round(url: str, start: int, rnd: random.Random, concurrency: int = 16) -> None:
    """1,000 valid requests, ``concurrency`` at a time (also bench/bench_memory_peak.py's load)."""
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=max(100, concurrency))
    async with httpx.AsyncClient(base_url=url, headers=AUTH1, timeout=300, limits=limits) as c:

        async def one(i: int) -> None:
            async with sem:
                body = {
                    "class_label": rnd.randrange(10),
                    "steps": rnd.choice([2, 3]),
                    "n": rnd.choice([1, 4]),
                }
                if i % 2:  # half kept for GET /jobs (the store fills), half delivered and dropped
                    r = await c.post("/sample?keep=true", json={**body, "seed": i})
                else:
                    r = await c.post("/sample", json={**body, "seed": i}, headers={"Accept": "image/png"})
                assert r.status_code == 200, r.text

        await asyncio.gather(*(one(start + i) for i in range(1000)))


def test_rss_is_flat_once_the_result_store_is_full(small_store_server: Server) -> None:
    srv = small_store_server
    rnd = random.Random(1)
    at_end: list[float] = []
    curve: dict[int, float] = {}  # round -> RSS once trimmed, for the rounds the bounds read
    trimmed = range(ROUNDS) if SOAK else (1, 3)
    for k in range(ROUNDS):
        asyncio.run(load_round(srv.url, k * 1000, rnd))
        at_end.append(rss_mib(srv.proc.pid))
        if k in trimmed:
            # what the server keeps: read once its malloc_trim thread has handed the free pages back
            # (a wait of TRIM_EVERY_S + 1 s, so only after the rounds a bound reads; the thread trims
            # every few seconds during the rounds anyway)
            time.sleep(TRIM_EVERY_S + 1)
            curve[k] = rss_mib(srv.proc.pid)
    print(
        "\nserver RSS after each 1,000 requests (MiB), as the round ends: "
        + ", ".join(f"{v:.0f}" for v in at_end)
    )
    print("and once trimmed: " + ", ".join(f"round {k + 1}: {v:.0f}" for k, v in curve.items()))
    jobs = httpx.get(f"{srv.url}/jobs?limit=1000", headers=AUTH1, timeout=30).json()
    assert len(jobs) == KEPT, "the store holds its limit of finished jobs"
    # The store is full within the first round; the allocator's arenas still grow into the second
    # (the soak levels off from round 3: e.g. 550, 585, 599, 599, 611, 610, 611, 610, 611 MiB), so the
    # bound is on the 2,000 requests after that (issue 23: +48 MiB): a finished job pinning its batch
    # output (the bug this guards) added 81 MiB over 2,000 requests; glibc keeping what a busier
    # moment allocated (before malloc_trim) +23 and +61 MiB in two runs.
    assert curve[3] - curve[1] < 48, f"RSS grew {curve[3] - curve[1]:.0f} MiB from 2,000 to 4,000 requests"
    if SOAK:  # and it levels off: the second half of a long run adds next to nothing
        half = [curve[k] for k in range(ROUNDS // 2, ROUNDS)]
        assert max(half) - half[0] < 25, f"RSS still rising in the second half: {half}"
    assert crashes(srv) == []

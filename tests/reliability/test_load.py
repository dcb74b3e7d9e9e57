"""Mixed load on the real server: valid requests (JSON and PNG, sync and jobs), malformed bodies and
clients that vanish mid-request, all at once. No 5xx, no connection errors, every 200 valid, and a
seed gives the same bytes under load as alone."""

from __future__ import annotations

import asyncio
import base64
import io
import random
from collections import Counter

import httpx
from PIL import Image

from tests.support.server import Server

from .support import AUTH1, SOAK, crashes

REQUESTS, CONCURRENCY = (1500, 64) if SOAK else (300, 32)
PINNED = {"class_label": 5, "steps": 6, "n": 2, "seed": 424242, "sampler": "euler_ancestral"}

MALFORMED = [
    b"{",
    b"[]",
    b"null",
    b'"text"',
    b'{"steps": "many"}',
    b'{"steps": NaN}',
    b'{"cfg_scale": 1e400}',
    b'{"seed": [1, Infinity]}',
    b'{"n": 100000}',
    b'{"sampler": "nope"}',
    b'{"bogus": 1}',
    b'{"class_label": 99}',
    b'{"init_image": "not base64!"}',
    b"\xff\xfe\x00",
]


def _valid_png(data: bytes) -> bool:
    try:
        Image.open(io.BytesIO(data)).verify()
        return True
    except Exception:
        return False


async def _vanish(server: Server, rnd: random.Random) -> str:
    """Send a whole request, then close the socket before the answer."""
    body = b'{"class_label": 3, "steps": 200}'
    head = (
        f"POST /sample HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH1['Authorization']}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    _, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(head + (body if rnd.random() < 0.7 else body[:10]))  # some vanish mid-body
    await writer.drain()
    await asyncio.sleep(rnd.uniform(0, 0.05))
    writer.close()
    return "vanished"


async def _run(server: Server) -> tuple[Counter[str], list[str], list[bytes]]:
    rnd = random.Random(7)
    sem = asyncio.Semaphore(CONCURRENCY)
    outcomes: Counter[str] = Counter()
    problems: list[str] = []
    pinned: list[bytes] = []
    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=server.url, headers=AUTH1, timeout=120, limits=limits) as c:

        async def one(i: int) -> None:
            async with sem:
                roll = rnd.random()
                try:
                    if roll < 0.05:
                        outcomes[await _vanish(server, rnd)] += 1
                        return
                    if roll < 0.15:
                        r = await c.post("/sample", content=rnd.choice(MALFORMED))
                        outcomes[f"malformed {r.status_code // 100}xx"] += 1
                        if r.status_code >= 500 or r.status_code < 400:
                            problems.append(f"malformed body -> {r.status_code}: {r.text[:200]}")
                        return
                    if roll < 0.20:
                        r = await c.post("/sample", json=PINNED, headers={"Accept": "image/png"})
                        if r.status_code == 200:
                            pinned.append(r.content)
                    elif roll < 0.30:
                        job = (await c.post("/jobs", json={"class_label": i % 10, "steps": 3})).json()
                        status = "queued"
                        while status in ("queued", "running"):
                            await asyncio.sleep(0.02)
                            status = (await c.get(f"/jobs/{job['id']}")).json()["status"]
                        r = await c.get(f"/jobs/{job['id']}/images/0")
                    else:
                        body = {"class_label": rnd.randrange(10), "steps": rnd.choice([2, 4, 8]), "seed": i}
                        body["n"] = rnd.choice([1, 2])
                        accept = {"Accept": "image/png"} if rnd.random() < 0.5 else {}
                        r = await c.post("/sample", json=body, headers=accept)
                    outcomes[f"valid {r.status_code}"] += 1
                    if r.status_code != 200:
                        problems.append(f"valid request -> {r.status_code}: {r.text[:200]}")
                    elif r.headers["content-type"] == "image/png":
                        if not _valid_png(r.content):
                            problems.append("a 200 PNG that does not decode")
                    elif not all(_valid_png(base64.b64decode(b)) for b in r.json()["images"]):
                        problems.append("a 200 JSON body with an image that does not decode")
                except httpx.HTTPError as exc:
                    outcomes["connection error"] += 1
                    problems.append(f"connection error: {type(exc).__name__}: {exc}")

        await asyncio.gather(*(one(i) for i in range(REQUESTS)))
    return outcomes, problems, pinned


def test_mixed_load_no_5xx_no_connection_errors(server: Server) -> None:
    alone = httpx.post(
        f"{server.url}/sample", json=PINNED, headers={**AUTH1, "Accept": "image/png"}, timeout=60
    )
    assert alone.status_code == 200
    outcomes, problems, pinned = asyncio.run(_run(server))
    print(f"\n{REQUESTS} requests at concurrency {CONCURRENCY}: {dict(sorted(outcomes.items()))}")
    assert problems == []
    assert outcomes["valid 200"] > REQUESTS * 0.6
    assert pinned and all(p == alone.content for p in pinned), "a seed must give the same bytes under load"
    assert crashes(server) == []

"""The Ray Serve application on a local cluster (tests/deploy/conftest.py): 2 engine slots, 2 ingress
replicas. Mixed load, cross-replica jobs, overload, an engine replica killed while its jobs run."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api.app import create_app
from service.api.settings import Settings

from .conftest import ALICE, ENGINE_SETTINGS

pytestmark = pytest.mark.timeout(240)
SAMPLERS = ["euler", "dpmpp_2m", "heun", "euler_ancestral", "dpmpp_sde", "lms"]


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def engine_of(r: httpx.Response) -> str:
    return r.headers["x-kdiff-engine"].split(";")[0]


def replica_actor(deployment: str, replica: str | None = None) -> Any:
    import ray

    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if f"#{deployment}#" in a["name"] and (replica is None or a["name"].endswith(replica))
    ]
    assert names, f"no replica actor of {deployment}"
    return ray.get_actor(names[0], namespace="serve")


def request_body(i: int) -> dict[str, Any]:
    sampler = SAMPLERS[i % len(SAMPLERS)]
    return {"sampler": sampler, "steps": 4 + i % 5, "seed": 1000 + i, "class_label": i % 10}


@pytest.fixture(scope="module")
def single(tiny_store: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(model_store=tiny_store, **ENGINE_SETTINGS))) as c:
        yield c


def run_one(client: httpx.Client, i: int) -> tuple[str, list[str]]:
    body = request_body(i)
    if i % 2 == 0:
        r = client.post("/sample", json=body)
        assert r.status_code == 200, r.text
        return engine_of(r), r.json()["images"]
    r = client.post("/jobs", json=body)
    assert r.status_code == 202, r.text
    jid = r.json()["id"]
    if i % 4 == 1:  # follow it by SSE
        with client.stream("GET", f"/jobs/{jid}/events") as s:
            text = s.read().decode()
        assert "event: done" in text, text[-300:]
    for _ in range(600):
        view = client.get(f"/jobs/{jid}")
        assert view.status_code == 200, view.text
        if view.json()["status"] == "succeeded":
            return engine_of(r), view.json()["result"]["images"]
        assert view.json()["status"] in ("queued", "running"), view.text
        time.sleep(0.05)
    raise AssertionError(f"job {jid} did not finish")


def test_sixty_mixed_requests_both_engines_same_images(
    cluster: dict[str, Any], http: httpx.Client, single: TestClient
) -> None:
    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: run_one(http, i), range(60)))
    elapsed = time.monotonic() - t0
    engines = {e for e, _ in results}
    assert engines == {"engine0", "engine1"}, engines
    for i, (_, images) in enumerate(results):
        ref = single.post("/sample", json=request_body(i))
        assert ref.status_code == 200
        for got, want in zip(images, ref.json()["images"], strict=True):
            np.testing.assert_array_equal(pixels(got), pixels(want))
    print(f"60 mixed requests in {elapsed:.1f} s (cluster started in {cluster['started_s']:.1f} s)")


def test_models_and_metrics_come_from_every_engine(http: httpx.Client) -> None:
    """Run after the mixed load: both engines served, so both have counted jobs."""
    models = http.get("/models")
    assert models.status_code == 200, models.text
    entry = models.json()["models"][0]
    assert set(entry["engines"]) == {"engine0", "engine1"} and entry["state"] == "loaded", entry
    text = http.get("/metrics").text
    assert 'engine="engine0"' in text and 'engine="engine1"' in text
    assert text.count("# TYPE kdiff_jobs_total counter") == 1


def test_the_ingress_refuses_an_oversized_body_itself(http: httpx.Client) -> None:
    """A body without Content-Length past KDIFF_MAX_CHUNKED_BYTES (1 MiB): 413 from the ingress
    (no engine named), not after it has held the whole body and forwarded it."""

    def chunks() -> Iterator[bytes]:
        for _ in range(8):
            yield b" " * (256 * 1024)

    r = http.post("/sample", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "KDIFF_MAX_BODY_BYTES" in r.json()["detail"], r.text
    assert "x-kdiff-ingress" in r.headers and "x-kdiff-engine" not in r.headers
    assert http.post("/sample", json=request_body(0)).status_code == 200  # and it keeps serving


def other_ingress(client: httpx.Client, method: str, url: str, not_ingress: str) -> httpx.Response:
    for _ in range(60):
        r = client.request(method, url)
        if r.headers.get("x-kdiff-ingress") != not_ingress:
            return r
    raise AssertionError("the other ingress replica never answered")


def test_job_across_ingress_replicas(http: httpx.Client) -> None:
    slow = {"sampler": "heun", "steps": 150, "seed": 7, "class_label": 2, "n": 4}
    created = http.post("/jobs", json=slow)
    assert created.status_code == 202
    a, jid = created.headers["x-kdiff-ingress"], created.json()["id"]
    read = other_ingress(http, "GET", f"/jobs/{jid}", a)
    assert read.status_code == 200 and read.json()["id"] == jid
    for _ in range(60):  # stream it through the other ingress replica
        with http.stream("GET", f"/jobs/{jid}/events") as s:
            if s.headers.get("x-kdiff-ingress") == a:
                continue
            text = s.read().decode()
            break
    else:
        raise AssertionError("the other ingress replica never streamed")
    assert "event: done" in text and jid in text
    # API-key ownership holds whichever replicas answer: another key sees a 404, an admin key sees it
    bob, root = {"Authorization": "Bearer bob"}, {"Authorization": "Bearer root"}
    for _ in range(4):
        assert http.get(f"/jobs/{jid}", headers=bob).status_code == 404
        assert jid not in http.get("/jobs", headers=bob).text
        assert jid in http.get("/jobs", headers=root).text and jid in http.get("/jobs").text
    assert http.get(f"/jobs/{jid}", headers={"Authorization": ""}).status_code == 401
    # cancel through the other one
    job2 = http.post("/jobs", json={**slow, "steps": 400, "seed": 8})
    a2, jid2 = job2.headers["x-kdiff-ingress"], job2.json()["id"]
    cancelled = other_ingress(http, "DELETE", f"/jobs/{jid2}", a2)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
    # the result outlives the ingress replica that created the job
    import ray

    ray.kill(replica_actor("Ingress", a), no_restart=True)
    for _ in range(100):
        try:
            r = http.get(f"/jobs/{jid}")
        except httpx.HTTPError:
            r = None
        if r is not None and r.status_code == 200 and r.headers.get("x-kdiff-ingress") != a:
            assert r.json()["status"] == "succeeded" and len(r.json()["result"]["images"]) == 4
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the job was not readable after its ingress replica died")


def test_overload_gives_503_or_429_with_retry_after(cluster: dict[str, Any]) -> None:
    body = {"sampler": "euler", "steps": 60, "seed": 1, "class_label": 1, "n": 2}

    async def blast() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=cluster["url"], timeout=120, limits=limits, headers=ALICE) as c:
            return await asyncio.gather(*(c.post("/sample", json=body) for _ in range(140)))

    t0 = time.monotonic()
    responses = asyncio.run(blast())
    codes = [r.status_code for r in responses]
    refused = [r for r in responses if r.status_code in (429, 503)]
    assert set(codes) <= {200, 429, 503}, codes
    assert refused, codes
    bare = [(r.status_code, r.text) for r in refused if "retry-after" not in r.headers]
    assert not bare, bare[:3]
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    overloaded = [r for r in refused if r.status_code == 503]
    assert all(r.json()["detail"]["code"] == "overloaded" for r in overloaded), overloaded[0].text
    print(f"overload: {codes.count(200)} ok, {len(refused)} refused in {time.monotonic() - t0:.1f} s")


@pytest.mark.timeout(600)  # its jobs now run again after the kill
def test_engine_replica_killed_while_jobs_run(http: httpx.Client, single: TestClient) -> None:
    import ray

    body = {"sampler": "heun", "steps": 500, "seed": 3, "class_label": 5, "n": 8}
    jobs: dict[int, list[str]] = {0: [], 1: []}
    for i in range(12):
        r = http.post("/jobs", json={**body, "seed": i})
        assert r.status_code == 202
        jobs[int(r.json()["id"][:2], 16)].append(r.json()["id"])
        if len(jobs[0]) >= 2 and len(jobs[1]) >= 2 and i >= 5:
            break
    assert jobs[0] and jobs[1], jobs
    victim = jobs[0][0]
    events: list[str] = []

    def follow() -> None:
        with (
            httpx.Client(base_url=str(http.base_url), timeout=120, headers=ALICE) as c,
            c.stream("GET", f"/jobs/{victim}/events") as s,
        ):
            events.extend(s.iter_lines())

    streamer = threading.Thread(target=follow)
    streamer.start()
    for _ in range(200):
        if http.get(f"/jobs/{victim}").json()["status"] == "running":
            break
        time.sleep(0.05)
    old = http.get(f"/jobs/{victim}").headers["x-kdiff-engine"]
    ray.kill(replica_actor("engine0"), no_restart=True)
    streamer.join(60)
    assert not streamer.is_alive()
    assert any("engine_lost" in line for line in events), events[-5:]
    # the other slot keeps serving: its jobs finish
    for jid in jobs[1]:
        for _ in range(1200):
            view = http.get(f"/jobs/{jid}").json()
            if view["status"] != "running" and view["status"] != "queued":
                break
            time.sleep(0.1)
        assert view["status"] == "succeeded", view
    # the killed slot's jobs: Serve replaces engine0, and the new replica re-runs them from the slot's
    # job store (KDIFF_STATE_DIR/engine0) under their ids: they succeed, with a single process's images
    t0 = time.monotonic()
    for jid in jobs[0]:
        while True:
            r = http.get(f"/jobs/{jid}")
            if r.status_code == 200 and r.json()["status"] not in ("queued", "running"):
                assert r.json()["status"] == "succeeded", r.text
                break
            if r.status_code != 200:  # while engine0 is replaced
                assert r.status_code == 503 and r.json()["detail"]["code"] == "engine_lost", r.text
            assert time.monotonic() - t0 < 200, "engine0's jobs did not finish after its restart"
            time.sleep(0.5)
    replayed = http.get(f"/jobs/{victim}").json()["result"]
    clean = single.post("/sample", json={**body, "seed": replayed["seeds"][0]}).json()
    for got, want in zip(replayed["images"], clean["images"], strict=True):
        np.testing.assert_array_equal(pixels(got), pixels(want))
    # Serve restarted engine0 (a new incarnation) and it serves again
    for _ in range(100):
        r = http.post("/sample", json={"seed": 1, "class_label": 1})
        if r.status_code == 200 and engine_of(r) == "engine0":
            assert r.headers["x-kdiff-engine"] != old
            break
    else:
        raise AssertionError("the restarted engine0 served nothing")

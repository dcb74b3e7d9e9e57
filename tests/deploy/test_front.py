"""What an engine replica does before its app sees a request (service/deploy/front.py), without Ray:
two real service apps (one model each, as a placement puts them), each behind its Front, the peer relay
being the other app run in-process as EngineReplica.relay runs it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from service.api.app import create_app
from service.api.settings import Settings
from service.deploy.asgi import run_asgi
from service.deploy.front import Front
from service.deploy.routing import ENGINE_HEADER, job_prefix
from service.engine.jobs import Job
from tests.support.tiny_store import make_tiny_store

INCARNATIONS = ["aaaaaa", "bbbbbb"]


async def _scenario(store: Path) -> dict[str, Any]:
    placement = [["a"], ["b"]]
    settings = {"model_store": store, "torch_threads": 1, "batch_wait_ms": 0, "jit": False}
    apps = [create_app(Settings(**settings, models=models)) for models in placement]
    headers = [(ENGINE_HEADER, f"engine{k}; incarnation={INCARNATIONS[k]}; replica=r{k}") for k in (0, 1)]

    def peer(req: dict[str, Any], slot: int) -> Any:
        return run_asgi(apps[slot], req, [headers[slot]])

    limits = (1 << 20, 1 << 20)
    fronts = [
        Front(apps[k], k, INCARNATIONS[k], headers[k], placement, limits, None, 1.0, peer) for k in (0, 1)
    ]
    lives = [app.router.lifespan_context(app) for app in apps]
    for life in lives:
        await life.__aenter__()
    out: dict[str, Any] = {}
    try:
        clients = [
            httpx.AsyncClient(transport=httpx.ASGITransport(app=f), base_url="http://t") for f in fronts
        ]
        c0, c1 = clients
        body = {"steps": 2, "seed": 3, "class_label": 1}
        out["own"] = await c0.post("/sample", json={**body, "model": "a"})
        out["moved"] = await c0.post("/sample", json={**body, "model": "b"})
        out["direct"] = await c1.post("/sample", json={**body, "model": "b"})
        Job.id_prefix = job_prefix(1, INCARNATIONS[1])  # a job accepted by engine1
        created = await c1.post("/jobs", json={**body, "model": "b"})
        jid = created.json()["id"]
        for _ in range(200):
            out["job_via_peer"] = await c0.get(f"/jobs/{jid}")
            if out["job_via_peer"].json().get("status") == "succeeded":
                break
            await asyncio.sleep(0.02)
        out["job_id"] = jid
        out["stale"] = await c0.get(f"/jobs/{job_prefix(0, 'cccccc')}{'0' * 24}")
        out["listed"] = await c0.get("/jobs")
        out["models"] = await c0.get("/models")
        out["too_large"] = await c0.post("/sample", content=b"{" + b" " * (1 << 20) + b"}")
        for c in clients:
            await c.aclose()
    finally:
        for life in lives:
            await life.__aexit__(None, None, None)
    return out


def test_the_front_answers_its_own_and_relays_the_rest(tmp_path: Path) -> None:
    for i, name in enumerate(("a", "b")):
        make_tiny_store(tmp_path, name=name, seed=i)
    old = Job.id_prefix
    try:
        out = asyncio.run(_scenario(tmp_path))
    finally:
        Job.id_prefix = old
    own, moved, direct = out["own"], out["moved"], out["direct"]
    assert own.status_code == moved.status_code == direct.status_code == 200, (own.text, moved.text)
    # its own model: answered in-process, untouched; another slot's model: relayed to that slot
    assert own.headers[ENGINE_HEADER].startswith("engine0") and "x-kdiff-via" not in own.headers
    assert moved.headers[ENGINE_HEADER].startswith("engine1") and moved.headers["x-kdiff-via"] == "engine0"
    assert moved.json()["images"] == direct.json()["images"]  # the same answer as asked directly
    # a job engine1 holds, read through engine0; a job of an engine0 incarnation that is gone: 410
    view = out["job_via_peer"]
    assert view.status_code == 200 and view.json()["status"] == "succeeded", view.text
    assert view.headers[ENGINE_HEADER].startswith("engine1") and view.headers["x-kdiff-via"] == "engine0"
    stale = out["stale"]
    assert stale.status_code == 410 and stale.json()["detail"]["code"] == "engine_lost", stale.text
    # GET /jobs and /models: every engine's answer, merged
    assert out["job_id"] in [j["id"] for j in out["listed"].json()]
    engines = {m["name"]: m["engines"] for m in out["models"].json()["models"]}
    assert engines == {
        "a": {"engine0": "loaded", "engine1": "on_disk"},
        "b": {"engine0": "on_disk", "engine1": "loaded"},
    }
    # a body the front must read to route (placement): refused at the service's limit, naming it
    too_large = out["too_large"]
    assert too_large.status_code == 413 and "KDIFF_MAX_BODY_BYTES" in too_large.json()["detail"], (
        too_large.text
    )

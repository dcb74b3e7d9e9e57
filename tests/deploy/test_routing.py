"""Routing of the Ray Serve ingress (pure: no cluster) and the job-id prefix hook."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.api.app import create_app
from service.api.compat.image_links import ImageLinks
from service.api.settings import Settings
from service.deploy.routing import (
    Placement,
    incarnation_of,
    job_prefix,
    merge,
    requested_model,
    slot_of_job,
)
from service.engine.jobs import Job, JobRequest
from service.sampling.spec import SamplingSpec
from tests.support.tiny_store import make_tiny_store


def test_job_ids_carry_slot_and_incarnation() -> None:
    old = Job.id_prefix
    try:
        Job.id_prefix = job_prefix(3, "a1b2c3")
        job = Job(JobRequest(SamplingSpec("euler", "karras", 1, [0]), 1, {}), "m")
        assert len(job.id) == 32 and job.id.startswith("03a1b2c3")
        assert slot_of_job(job.id) == (3, "a1b2c3")
    finally:
        Job.id_prefix = old
    assert len(Job(JobRequest(SamplingSpec("euler", "karras", 1, [0]), 1, {}), "m").id) == 32


def test_routes() -> None:
    p = Placement([["digits"], ["sd"], []])
    jid = "01abcdef" + "0" * 24
    assert p.route("GET", f"/jobs/{jid}", b"").slots == [1]
    assert p.route("DELETE", f"/jobs/{jid}", b"").kind == "job"
    assert p.route("GET", f"/jobs/{jid}/events", b"").slots == [1]
    assert p.route("GET", "/jobs", b"").kind == "fanout"
    assert p.route("POST", "/sample", b'{"model": "sd"}').slots == [1]
    assert p.route("POST", "/jobs", b'{"model": "other"}').slots == [2]  # only the all-models slot
    assert p.route("POST", "/sample", b"{}").slots == [0, 1, 2]
    assert p.route("POST", "/models/digits/load", b"").slots == [0]
    assert p.route("GET", "/samplers", b"").slots == [0, 1, 2]
    assert requested_model(b"not json") is None and requested_model(b'{"model": 3}') is None
    p.inflight[:] = [2, 0, 1]
    assert p.pick([0, 1, 2]) == 1 and p.pick([0, 2]) == 2
    assert p.order([0, 1, 2]) == [1, 0, 2]  # the least busy first
    p.mark_down(1)  # it did not take new work: tried last until DOWN_S has passed
    assert p.order([0, 1, 2])[:2] == [2, 0] and p.order([0, 1, 2])[2] == 1
    p.down_until[1] = 0.0
    assert p.order([0, 1, 2])[0] == 1
    assert incarnation_of("engine1; incarnation=abc123; replica=x") == "abc123"


def test_an_openai_image_link_goes_to_the_replica_that_keeps_the_image() -> None:
    """Image links live in the memory of the engine replica that made them: their token starts with that
    replica's job-id prefix, and the ingress routes the link's GET there, not to the least busy slot."""
    old = Job.id_prefix
    try:
        Job.id_prefix = job_prefix(2, "a1b2c3")
        token = ImageLinks().put(b"png")
    finally:
        Job.id_prefix = old
    p = Placement([[], [], []])
    for ext in ("png", "jpeg", "webp"):  # the link's extension is the request's output_format
        route = p.route("GET", f"/v1/images/files/{token}.{ext}", b"")
        assert (route.kind, route.slots) == ("slot", [2])
    plain = ImageLinks().put(b"png")  # outside Ray: no prefix, any slot (there is one app)
    assert p.route("GET", f"/v1/images/files/{plain}.png", b"").kind == "any"


def _app(store_root: Path, models: list[str]) -> TestClient:
    settings = Settings(model_store=store_root, models=models, torch_threads=1, batch_wait_ms=0, jit=False)
    return TestClient(create_app(settings))


def test_models_and_metrics_of_every_slot_merge_into_one_answer(tmp_path: Path) -> None:
    """GET /models and /metrics through the ingress: the real answers of two engines (each with one of
    the store's two models loaded), merged as the ingress merges them."""
    for i, name in enumerate(("a", "b")):
        make_tiny_store(tmp_path, name=name, seed=i)
    assert Placement([[], []]).route("GET", "/models", b"").kind == "fanout"
    assert Placement([[], []]).route("GET", "/metrics", b"").kind == "fanout"
    with _app(tmp_path, ["a"]) as e0, _app(tmp_path, ["b"]) as e1:
        for client, model, n in ((e0, "a", 1), (e1, "b", 2), (e1, "b", 1)):
            assert client.post("/sample", json={"model": model, "steps": 2, "n": n}).status_code == 200
        models = [(0, e0.get("/models").content), (1, e1.get("/models").content)]
        metrics = [(0, e0.get("/metrics").content), (1, e1.get("/metrics").content)]
    body, media = merge("/models", models, 100)
    merged = json.loads(body)
    assert media == "application/json" and [m["name"] for m in merged["models"]] == ["a", "b"]
    a, b = merged["models"]
    assert a["state"] == b["state"] == "loaded" and a["class_labels"] == list(range(10))
    assert a["engines"] == {"engine0": "loaded", "engine1": "on_disk"}
    assert b["engines"] == {"engine0": "on_disk", "engine1": "loaded"}
    assert [e["engine"] for e in merged["engines"]] == ["engine0", "engine1"]
    assert merged["memory"]["used_bytes"] == sum(e["used_bytes"] for e in merged["engines"]) > 0

    text, media = merge("/metrics", metrics, 100)
    assert media.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}  # parses, or raises
    jobs = {
        (s.labels["engine"], s.labels["model"]): s.value
        for s in families["kdiff_jobs"].samples
        if s.name == "kdiff_jobs_total" and s.labels["status"] == "succeeded"
    }
    assert jobs == {("engine0", "a"): 1.0, ("engine1", "b"): 2.0}
    assert text.decode().count("# TYPE kdiff_jobs_total counter") == 1  # one family, samples of both


def test_each_engine_slot_gets_its_own_job_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A job store is one process's (flock): engine replicas share KDIFF_STATE_DIR as a parent, each
    slot in its own folder, so the replica Serve starts in place of a dead one re-runs that slot's jobs."""
    from service.deploy.ray_serve import slot_state

    monkeypatch.delenv("KDIFF_STATE_DIR", raising=False)
    assert slot_state({"max_queue": 3}, 1) == {"max_queue": 3}  # none: in memory, as before
    assert slot_state({"state_dir": str(tmp_path)}, 1) == {"state_dir": str(tmp_path / "engine1")}
    monkeypatch.setenv("KDIFF_STATE_DIR", str(tmp_path))
    assert slot_state({}, 0) == {"state_dir": str(tmp_path / "engine0")}


def test_a_job_two_engines_list_is_listed_once_as_it_ended() -> None:
    """With the Redis store one engine may hold a job's stale view (queued: read while it moved) and
    another its end; GET /jobs lists it once, ended, newest first, within the limit."""
    a = [
        {"id": "j1", "status": "queued", "created_at": 1.0},
        {"id": "j2", "status": "succeeded", "created_at": 2.0},
    ]
    b = [
        {"id": "j1", "status": "succeeded", "created_at": 1.0},
        {"id": "j3", "status": "running", "created_at": 3.0},
    ]
    body, _ = merge("/jobs", [(0, json.dumps(a).encode()), (1, json.dumps(b).encode())], 10)
    assert [(j["id"], j["status"]) for j in json.loads(body)] == [
        ("j3", "running"),
        ("j2", "succeeded"),
        ("j1", "succeeded"),
    ]
    body, _ = merge("/jobs", [(1, json.dumps(b).encode()), (0, json.dumps(a).encode())], 2)
    assert [(j["id"], j["status"]) for j in json.loads(body)] == [("j3", "running"), ("j2", "succeeded")]


def test_the_ingress_answers_its_own_errors_in_the_routes_shapes() -> None:
    """503/410/404 the ingress makes itself (engine down, at its cap) reach OpenAI and A1111 clients in the
    shape they parse, as the engines' own errors do; elsewhere our {"detail": {"code", "message"}}."""
    from service.deploy.ray_serve import _error

    def parsed(path: str) -> tuple[Any, str | None]:
        r = _error(503, "engine_lost", "engine0 went away", 2.2, path=path)
        assert r.status_code == 503
        return json.loads(bytes(r.body)), r.headers.get("retry-after")

    openai, after = parsed("/v1/images/generations")
    assert after == "3" and openai == {
        "error": {
            "message": "engine0 went away",
            "type": "server_error",
            "param": None,
            "code": "engine_lost",
        }
    }
    a1111, _ = parsed("/sdapi/v1/txt2img")
    assert a1111["error"] == "HTTPException" and a1111["errors"] == "engine0 went away"
    assert a1111["detail"] == {"code": "engine_lost", "message": "engine0 went away"}
    ours, _ = parsed("/sample")
    assert ours == {"detail": {"code": "engine_lost", "message": "engine0 went away"}}

"""Jobs API, SSE progress, cancel, 429, auth, info endpoints and metrics."""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi.testclient import TestClient

from tests.support.sse import sse_events


def test_job_runs_and_streams_progress_then_done(client: TestClient) -> None:
    r = client.post("/jobs", json={"steps": 8, "seed": 3, "class_label": 2, "sampler": "heun"})
    assert r.status_code == 202
    job_id = r.json()["id"]
    assert r.headers["location"] == f"/jobs/{job_id}"
    events = sse_events(client, f"/jobs/{job_id}/events?preview=true")
    kinds = [e for e, _ in events]
    assert kinds[-1] == "done" and "progress" in kinds
    steps = [d["step"] for e, d in events if e == "progress"]
    assert steps == sorted(steps) and all(d["total"] == 8 for e, d in events if e == "progress")
    assert any("preview" in d for e, d in events if e == "progress")
    done = events[-1][1]
    assert done["seeds"] == [3] and len(done["images"]) == 1
    view = client.get(f"/jobs/{job_id}").json()
    assert view["status"] == "succeeded" and view["progress"]["fraction"] == 1.0
    assert view["result"]["images"] == done["images"]
    png = client.get(f"/jobs/{job_id}/images/0")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert any(j["id"] == job_id for j in client.get("/jobs", params={"status": "succeeded"}).json())


def test_adaptive_sampler_job_streams_steps_within_the_total_and_a_growing_fraction(
    client: TestClient,
) -> None:
    # dpm_adaptive's evaluation count is not known ahead: its progress is its way down in log sigma
    body = {"class_label": 3, "steps": 3, "sampler": "dpm_adaptive", "n": 4, "seed": 5}
    job_id = client.post("/jobs", json=body).json()["id"]
    events = sse_events(client, f"/jobs/{job_id}/events")
    assert events[-1][0] == "done" and len(events[-1][1]["images"]) == 4
    progress = [d for e, d in events if e == "progress"]
    assert progress and all(d["step"] <= d["total"] == 3 for d in progress)
    fractions = [d["fraction"] for d in progress]
    assert fractions == sorted(fractions) and len(set(fractions)) > 1
    # 1 only once sampled (its last event may come while the images are encoded)
    assert all(d["step"] == 3 for d in progress if d["fraction"] == 1.0)
    assert all(d["fraction"] < 1.0 for d in progress if d["step"] < 3)
    assert client.get(f"/jobs/{job_id}").json()["progress"] == {
        "step": 3,
        "total": 3,
        "fraction": 1.0,
        "eta_s": None,
    }


def test_delete_cancels_a_running_job(client: TestClient) -> None:
    # heunpp2: three model calls per step, so 500 steps run for about a second on the tiny model
    job_id = client.post("/jobs", json={"steps": 500, "sampler": "heunpp2"}).json()["id"]
    deadline = time.monotonic() + 10
    while client.get(f"/jobs/{job_id}").json()["status"] != "running" and time.monotonic() < deadline:
        time.sleep(0.01)
    r = client.delete(f"/jobs/{job_id}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert sse_events(client, f"/jobs/{job_id}/events")[-1][0] == "cancelled"


def test_full_queue_answers_429_with_retry_after(make_client: Callable[..., TestClient]) -> None:
    with make_client(max_queue=1, batching="serial") as c:
        statuses = []
        for _ in range(4):
            r = c.post("/jobs", json={"steps": 500})
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
                break
        assert statuses[0] == 202 and statuses[-1] == 429
        for job in c.get("/jobs").json():
            c.delete(f"/jobs/{job['id']}")


def test_api_keys_guard_work_but_not_probes(make_client: Callable[..., TestClient]) -> None:
    with make_client(api_keys="s3cret,other") as c:
        assert c.post("/sample", json={"steps": 1}).status_code == 401
        assert (
            c.post("/sample", json={"steps": 1}, headers={"Authorization": "Bearer wrong"}).status_code == 401
        )
        ok = c.post("/sample", json={"steps": 1}, headers={"Authorization": "Bearer other"})
        assert ok.status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200


def test_info_endpoints_describe_options_with_bounds(client: TestClient) -> None:
    samplers = {s["name"]: s for s in client.get("/samplers").json()["samplers"]}
    assert samplers["euler_ancestral"]["options"]["eta"] == {
        "default": 1.0,
        "type": "number",
        "minimum": 0.0,
        "maximum": 10.0,
    }
    schedules = {s["name"]: s for s in client.get("/schedules").json()["schedules"]}
    assert schedules["karras"]["options"]["rho"]["default"] == 7.0
    models = client.get("/models").json()
    assert models["default"] == "tiny"
    assert models["models"][0]["class_labels"] == list(range(10)) and models["models"][0]["width"] == 8
    assert client.get("/readyz").json()["ready"] is True
    schema = client.get("/openapi.json").json()
    props = schema["components"]["schemas"]["SampleRequest"]["properties"]
    assert all(p.get("description") for p in props.values())


def test_metrics_report_requests_batches_and_jobs(client: TestClient) -> None:
    assert client.post("/sample", json={"steps": 2}).status_code == 200
    text = client.get("/metrics").text
    assert 'kdiff_http_requests_total{method="POST",route="/sample",status="200"}' in text
    for name in (
        "kdiff_batch_rows_bucket",
        "kdiff_network_call_rows_bucket",
        "kdiff_model_call_seconds_bucket",
        "kdiff_queue_depth",
        "kdiff_running_jobs",
        "kdiff_job_phase_seconds_bucket",
        "kdiff_nfe_total",
    ):
        assert name in text, name
    assert 'phase="queue"' in text

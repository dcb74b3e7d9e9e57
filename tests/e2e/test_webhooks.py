"""Webhooks end to end: the real server (uvicorn subprocess) posting to a receiver on 127.0.0.1
that verifies every signature the way Stripe documents (tests/support/webhook_receiver.py)."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.server import Server
from tests.support.tiny_store import make_tiny_store
from tests.support.webhook_receiver import Receiver

SECRET = "whsec_e2e_0123456789"
KEY1, KEY2 = "key-one", "key-two"
AUTH1 = {"Authorization": f"Bearer {KEY1}"}
AUTH2 = {"Authorization": f"Bearer {KEY2}"}
LONG = 10_000  # steps of a job that must still run when it is cancelled or times out


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_store(tmp_path_factory.mktemp("webhook-store"))


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver(SECRET)
    yield r
    r.close()


def start(store: Path, log: Path, receiver: Receiver, **env: str) -> Server:
    settings = {
        "KDIFF_API_KEYS": f"{KEY1},{KEY2}",
        "KDIFF_MAX_STEPS": str(LONG),
        # loopback explicitly (the receiver), and every public host; "*" reaches no private address
        "KDIFF_WEBHOOK_ALLOW": "127.0.0.1:*,*:*",
        "KDIFF_WEBHOOK_SECRET": SECRET,
        "KDIFF_WEBHOOK_URLS": f"{KEY2}={receiver.url('/default')}",
        "KDIFF_WEBHOOK_RETRY_BASE_S": "0.2",
    }
    srv = Server(store, log, **{**settings, **env})
    srv.wait_ready()
    return srv


@pytest.fixture(scope="module")
def server(store: Path, receiver: Receiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start(store, tmp_path_factory.mktemp("log") / "server.log", receiver, KDIFF_WEBHOOK_TIMEOUT_S="10")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture()
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30, headers=AUTH1) as c:
        yield c


def submit(http: httpx.Client, **body: Any) -> str:
    r = http.post("/jobs", json={"class_label": 3, "seed": 1, **body})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def wait_view(http: httpx.Client, job_id: str, done: Any, timeout_s: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        view = http.get(f"/jobs/{job_id}").json()
        if done(view):
            return dict(view)
        time.sleep(0.05)
    raise AssertionError(f"job {job_id}: {view}")


def settled(view: dict[str, Any]) -> bool:
    hooks = view.get("webhooks") or []
    return bool(hooks) and all(h["state"] != "pending" for h in hooks)


def test_every_terminal_event_is_delivered_with_a_valid_signature(
    http: httpx.Client, server: Server, receiver: Receiver
) -> None:
    url = receiver.on("/ok")
    jobs = {submit(http, callback_url=url, seed=s, n=1 + s % 3): "succeeded" for s in range(6)}
    jobs[submit(http, callback_url=url, steps=LONG, timeout_s=0.2)] = "failed"
    cancelled = submit(http, callback_url=url, steps=LONG)
    assert http.delete(f"/jobs/{cancelled}").json()["status"] == "cancelled"
    jobs[cancelled] = "cancelled"
    views = {job_id: wait_view(http, job_id, settled) for job_id in jobs}
    posts = receiver.wait("/ok", len(jobs))
    assert all(p.verdict == "ok" for p in posts), [p.verdict for p in posts]
    by_job = {p.json["id"]: p for p in posts}
    assert len(posts) == len(jobs) and set(by_job) == set(jobs)  # each job's event exactly once
    for job_id, status in jobs.items():
        view, post = views[job_id], by_job[job_id]
        body = post.json
        assert view["status"] == body["status"] == status
        assert body["event"] == post.headers["Kdiff-Event"] == f"job.{status}"
        (hook,) = view["webhooks"]
        assert hook["state"] == "delivered" and hook["attempt_count"] == 1
        assert hook["attempts"][0]["status_code"] == 200 and hook["id"] == post.headers["Kdiff-Delivery"]
        if status == "succeeded":
            assert body["parameters"]["seeds"] == view["result"]["seeds"]
            assert len(body["links"]["images"]) == len(view["result"]["images"])
            for link, image in zip(body["links"]["images"], view["result"]["images"], strict=True):
                assert http.get(link).content == base64.b64decode(image)
        elif status == "failed":
            assert body["error"]["code"] == view["error"]["code"] == "deadline_exceeded"
    # the per-key default (KDIFF_WEBHOOK_URLS) for a job that names no callback_url
    other = httpx.post(f"{server.url}/jobs", json={"class_label": 1}, headers=AUTH2).json()["id"]
    (post,) = receiver.wait("/default", 1)
    assert post.json["id"] == other and post.verdict == "ok"
    assert http.get(f"/jobs/{other}").status_code == 404  # still key two's job only


def test_a_receiver_failing_three_times_gets_the_fourth(http: httpx.Client, receiver: Receiver) -> None:
    job_id = submit(http, callback_url=receiver.on("/flaky", fail_first=3))
    view = wait_view(http, job_id, settled)
    (hook,) = view["webhooks"]
    assert hook["state"] == "delivered" and hook["attempt_count"] == 4
    assert [a["status_code"] for a in hook["attempts"]] == [500, 500, 500, 200]
    starts = [a["at"] for a in hook["attempts"]]
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert gaps[0] >= 0.1 and gaps[2] >= 0.4 and gaps[2] > gaps[0]  # 0.2 s base, doubling, jittered
    posts = receiver.posts("/flaky")
    assert len(posts) == 4 and all(p.verdict == "ok" for p in posts)
    assert {p.headers["Kdiff-Delivery"] for p in posts} == {hook["id"]}
    assert all(p.json["id"] == job_id for p in posts)
    metrics = http.get("/metrics").text
    retries = [
        ln for ln in metrics.splitlines() if ln.startswith('kdiff_webhook_attempts_total{outcome="retry"}')
    ]
    assert retries and float(retries[0].split()[-1]) >= 3


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://localhost:{port}/hidden", "loopback"),  # a name for loopback, allowed only as "*"
        ("http://2130706433:{port}/hidden", "loopback"),  # 127.0.0.1 spelt as one number
        ("http://167772161/hidden", "private"),  # 10.0.0.1 spelt as one number
        ("http://0xa9fea9fe/latest/meta-data/", "link-local"),  # the cloud metadata address
        ("http://127.0.0.1:{port}/moved", "redirect to"),  # a 302: not followed
    ],
)
def test_refused_targets_are_failed_deliveries(
    http: httpx.Client, receiver: Receiver, url: str, why: str
) -> None:
    receiver.on("/moved", redirect_to=receiver.url("/hidden"))
    job_id = submit(http, callback_url=url.format(port=receiver.port))
    (hook,) = wait_view(http, job_id, settled)["webhooks"]
    assert hook["state"] == "failed" and hook["attempt_count"] == 1, hook  # never retried
    assert why in hook["attempts"][0]["error"]
    assert receiver.posts("/hidden") == []


@pytest.mark.parametrize(
    "url",
    ["http://10.0.0.1/x", "http://[::ffff:192.168.0.1]/x", "ftp://example.com/x", "https://u:p@example.com/"],
)
def test_a_refused_callback_url_is_a_422_at_submit(http: httpx.Client, url: str) -> None:
    r = http.post("/jobs", json={"class_label": 3, "callback_url": url})
    assert r.status_code == 422
    (err,) = r.json()["detail"]
    assert err["loc"] == ["body", "callback_url"] and "callback_url refused" in err["msg"]


def test_started_and_progress_events_at_the_rate_asked(http: httpx.Client, receiver: Receiver) -> None:
    url = receiver.on("/progress")
    job_id = submit(http, callback_url=url, steps=LONG, callback_progress_s=1)
    t0 = time.monotonic()
    time.sleep(3.2)
    assert http.delete(f"/jobs/{job_id}").json()["status"] == "cancelled"
    elapsed = time.monotonic() - t0
    wait_view(http, job_id, settled)
    posts = receiver.wait("/progress", 1)
    events = [p.json["event"] for p in posts]
    assert all(p.verdict == "ok" for p in posts) and all(p.json["id"] == job_id for p in posts)
    assert events[0] == "job.started" and events[-1] == "job.cancelled", events
    progress = [p for p in posts if p.json["event"] == "job.progress"]
    assert 2 <= len(progress) <= elapsed + 1, events  # one a second at most
    steps = [p.json["progress"]["step"] for p in progress]
    assert steps == sorted(steps) and steps[-1] > 0
    gaps = [b.at - a.at for a, b in zip(progress, progress[1:], strict=False)]
    assert all(g > 0.8 for g in gaps), gaps
    (hook,) = http.get(f"/jobs/{job_id}").json()["webhooks"]  # GET lists the stored (terminal) one
    assert hook["event"] == "job.cancelled"


def _until_all(http: httpx.Client, ids: list[str]) -> float:
    t0 = time.monotonic()
    for job_id in ids:
        wait_view(http, job_id, lambda v: v["status"] == "succeeded")
    return time.monotonic() - t0


def test_a_slow_receiver_does_not_slow_other_jobs(http: httpx.Client, receiver: Receiver) -> None:
    """Jobs whose receiver answers after 8 s hold the delivery slots they may (half of the 8 for one
    host); other jobs still finish as fast as before, and their webhooks, to another receiver, go
    out at once."""
    fast = receiver.on("/fast")
    baseline = _until_all(http, [submit(http, callback_url=fast, seed=s, steps=30) for s in range(8)])
    receiver.wait("/fast", 8)
    sluggish = Receiver(SECRET)  # another host:port
    try:
        slow = sluggish.on("/slow", delay_s=8.0)
        _until_all(http, [submit(http, callback_url=slow, seed=s) for s in range(12)])
        deadline = time.monotonic() + 2
        while sluggish.arrived("/slow") < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        t0 = time.monotonic()
        during = _until_all(http, [submit(http, callback_url=fast, seed=100 + s, steps=30) for s in range(8)])
        receiver.wait("/fast", 16, timeout_s=10)
        delivered_s = time.monotonic() - t0
        held = sluggish.arrived("/slow")
        assert held == 4 and sluggish.posts("/slow") == []  # 4 slots held, nothing answered yet
        print(
            f"baseline {baseline:.2f} s, with slow receivers {during:.2f} s, delivered in {delivered_s:.2f} s"
        )
        assert during < 2 * baseline + 1.0, (baseline, during)
        assert delivered_s < 4.0  # long before the slow receiver answers anything (8 s)
    finally:
        sluggish.close()


def test_kill_9_loses_no_webhook(
    store: Path, receiver: Receiver, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """``kill -9`` with (a) a finished job's delivery pending in the outbox after a failed attempt
    and (b) a job still queued or running: the next server on the same state dir sends (a) with
    the same delivery id, runs (b) again and sends its webhook once."""
    state = tmp_path_factory.mktemp("state")
    logs = tmp_path_factory.mktemp("restart-log")
    later = receiver.on("/later", fail_first=10**6)
    replayed = receiver.on("/replayed")
    srv = start(
        store, logs / "first.log", receiver, KDIFF_STATE_DIR=str(state), KDIFF_WEBHOOK_RETRY_BASE_S="1"
    )
    try:
        with httpx.Client(base_url=srv.url, timeout=30, headers=AUTH1) as c:
            pending = submit(c, callback_url=later)
            view = wait_view(
                c, pending, lambda v: (v.get("webhooks") or [{}])[0].get("attempt_count", 0) >= 1
            )
            running = submit(c, callback_url=replayed, steps=3000, seed=5)
    finally:
        srv.stop()  # SIGKILL
    (hook,) = view["webhooks"]
    assert hook["state"] == "pending" and hook["attempts"][0]["status_code"] == 500
    assert receiver.posts("/replayed") == []
    receiver.behaviours["/later"].fail_first = 0  # the receiver is back
    again = start(store, logs / "second.log", receiver, KDIFF_STATE_DIR=str(state))
    try:
        (post,) = receiver.wait("/later", 1, timeout_s=30)
        (replay,) = receiver.wait("/replayed", 1, timeout_s=60)
        with httpx.Client(base_url=again.url, timeout=30, headers=AUTH1) as c:
            (after,) = wait_view(c, pending, settled)["webhooks"]  # the job and its delivery, restored
            replayed_view = wait_view(c, running, settled)
        time.sleep(0.5)
    finally:
        again.stop()
    assert post.verdict == "ok" and post.json["id"] == pending and post.json["status"] == "succeeded"
    assert post.headers["Kdiff-Delivery"] == hook["id"] == after["id"]
    assert after["state"] == "delivered" and [a["status_code"] for a in after["attempts"]][-1] == 200
    assert len(receiver.posts("/later")) == 2  # the failed attempt before the kill, the one after
    assert not list(state.glob("webhook*"))  # the outbox is a table of the job store's file
    assert len(receiver.posts("/replayed")) == 1
    assert replay.verdict == "ok" and replay.json["id"] == running and replay.json["status"] == "succeeded"
    assert replay.json["parameters"]["seeds"] == replayed_view["result"]["seeds"] == [5]

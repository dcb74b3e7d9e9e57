"""KDIFF_STATE_DIR in process: what is recorded, what a restart brings back, bounds and expiry, the
replay limit, synchronous requests, terminal listeners. (kill -9 of a real server:
tests/reliability/test_crash_replay.py.)"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.engine import Job
from service.serving.jobstore import JOB, SYNC, StateDB, TerminalEvent, placeholder
from service.serving.jobstore.codec import encode_request
from service.serving.jobstore.store import DurableJobs
from service.serving.request import GenerationRequest

KEYS = {"api_keys": "k1,k2"}
K1, K2 = {"Authorization": "Bearer k1"}, {"Authorization": "Bearer k2"}


def rows(state: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(state / "state.sqlite3") as conn:
        return list(
            conn.execute("SELECT id, kind, status, attempts, error_message FROM jobs ORDER BY created")
        )


def result_files(state: Path) -> list[Path]:
    return sorted((state / "results").glob("*/*.png"))


def wait(client: TestClient, job_id: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        view = client.get(f"/jobs/{job_id}", headers=headers or {}).json()
        if view.get("status", "gone") in ("succeeded", "failed", "cancelled", "gone"):
            return dict(view)  # ("gone": dropped at once, by a bound)
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish")


def stored(state: Path, request: GenerationRequest, attempts: int = 0, kind: str = JOB) -> str:
    """A row as an earlier process left it: accepted, not finished."""
    db = StateDB(state)
    job = Job(placeholder(60), "tiny")
    DurableJobs(db).accepted(job, kind, lambda: encode_request(request)).result()
    db.write(lambda c: c.execute("UPDATE jobs SET attempts = ? WHERE id = ?", (attempts, job.id))).result()
    db.close()
    return job.id


def test_finished_results_survive_a_restart_keep_their_owner_and_expire(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    state = str(tmp_path)
    with make_client(state_dir=state, **KEYS) as c:
        job_id = c.post("/jobs", json={"class_label": 3, "steps": 3, "n": 2}, headers=K1).json()["id"]
        before = wait(c, job_id, K1)
        assert before["status"] == "succeeded"
        pngs = [c.get(f"/jobs/{job_id}/images/{i}", headers=K1).content for i in range(2)]
    assert len(result_files(tmp_path)) == 2 and rows(tmp_path)[0][2] == "succeeded"
    with make_client(state_dir=state, **KEYS) as c:
        after = c.get(f"/jobs/{job_id}", headers=K1).json()
        assert after["result"] == before["result"] | {"timings": after["result"]["timings"]}
        assert [c.get(f"/jobs/{job_id}/images/{i}", headers=K1).content for i in range(2)] == pngs
        assert c.get(f"/jobs/{job_id}", headers=K2).status_code == 404
        assert [j["id"] for j in c.get("/jobs", headers=K1).json()] == [job_id]
        assert c.get("/jobs", headers=K2).json() == []
    time.sleep(0.05)
    with make_client(state_dir=state, result_ttl_s=0.01, **KEYS) as c:  # expired: row and files go
        assert c.get(f"/jobs/{job_id}", headers=K1).status_code == 404
    assert rows(tmp_path) == [] and result_files(tmp_path) == []


def test_the_result_bytes_bound_drops_the_oldest_rows_and_their_files(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    with make_client(state_dir=str(tmp_path), max_result_bytes=1) as c:
        ids = [c.post("/jobs", json={"class_label": k, "steps": 2, "seed": k}).json()["id"] for k in range(3)]
        for job_id in ids:
            wait(c, job_id)
        c.get("/jobs")  # the in-memory store purges on access; the durable one follows
    # over the budget, every finished result goes (oldest first): the newest may be kept while alone
    left = [r[0] for r in rows(tmp_path)]
    assert set(left) <= {ids[-1]} and len(result_files(tmp_path)) == len(left)


def test_a_job_left_queued_is_replayed_with_its_seed_and_one_replayed_too_often_fails(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    request = GenerationRequest(class_label=5, steps=3, n=2, seed=[11, 12], sampler="euler_ancestral")
    again = stored(tmp_path, request, attempts=1)
    poison = stored(tmp_path, request, attempts=3)
    with make_client(state_dir=str(tmp_path), replay_attempts=3) as c:
        view = wait(c, again)
        assert view["status"] == "succeeded" and view["result"]["seeds"] == [11, 12]
        clean = c.post(
            "/sample",
            json={"class_label": 5, "steps": 3, "n": 2, "seed": [11, 12], "sampler": "euler_ancestral"},
        )
        assert view["result"]["images"] == clean.json()["images"]
        failed = wait(c, poison)
        assert failed["status"] == "failed" and failed["error"]["code"] == "internal"
        assert "KDIFF_REPLAY_ATTEMPTS=3" in failed["error"]["message"]
    by_id = {r[0]: r for r in rows(tmp_path)}
    assert by_id[again][2:4] == ("succeeded", 2) and by_id[poison][2] == "failed"


def test_queued_jobs_at_a_graceful_stop_stay_queued_and_run_at_the_next_start(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    state = str(tmp_path)
    with make_client(state_dir=state, drain_timeout_s=0, max_batch_rows=2, invariant_rows=2) as c:
        ids = [
            c.post("/jobs", json={"class_label": 1, "steps": 300, "seed": k}).json()["id"] for k in range(4)
        ]
    assert {r[2] for r in rows(tmp_path)} <= {"queued", "succeeded"}
    assert any(r[2] == "queued" for r in rows(tmp_path))
    with make_client(state_dir=state) as c:
        assert all(wait(c, job_id)["status"] == "succeeded" for job_id in ids)


def test_synchronous_requests_are_recorded_while_they_run_only(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    interrupted = stored(tmp_path, GenerationRequest(class_label=1, steps=2), kind=SYNC)
    with make_client(state_dir=str(tmp_path)) as c:
        assert c.post("/sample", json={"class_label": 2, "steps": 2}).status_code == 200
        assert c.get(f"/jobs/{interrupted}").status_code == 404  # nobody waits for it any more
    assert rows(tmp_path) == [] and result_files(tmp_path) == []


def test_terminal_listeners_run_once_per_job_in_its_transaction(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    seen: list[tuple[str, str, bool]] = []

    def listener(event: TerminalEvent, conn: sqlite3.Connection | None) -> None:
        assert conn is not None and conn.in_transaction
        status = conn.execute("SELECT status FROM jobs WHERE id = ?", (event.job.id,)).fetchone()
        seen.append((event.job.id, event.kind, status is None or status[0] == event.job.status.value))
        conn.execute("CREATE TABLE IF NOT EXISTS outbox (job TEXT)")
        conn.execute("INSERT INTO outbox VALUES (?)", (event.job.id,))
        raise RuntimeError("a broken listener is rolled back alone")

    client = make_client(state_dir=str(tmp_path))
    client.app.state.service.add_terminal_listener(listener)  # type: ignore[attr-defined]
    with client as c:
        job_id = c.post("/jobs", json={"class_label": 2, "steps": 2}).json()["id"]
        wait(c, job_id)
        c.post("/sample", json={"class_label": 2, "steps": 2})
    assert [(k, ok) for _, k, ok in seen] == [(JOB, True), (SYNC, True)] and seen[0][0] == job_id
    assert rows(tmp_path)[0][:3] == (job_id, JOB, "succeeded")


def test_without_a_state_dir_listeners_run_on_the_loop(make_client: Callable[..., TestClient]) -> None:
    seen: list[str] = []
    client = make_client()
    client.app.state.service.add_terminal_listener(lambda e, conn: seen.append(f"{e.kind}:{conn}"))  # type: ignore[attr-defined]
    with client as c:
        wait(c, c.post("/jobs", json={"class_label": 2, "steps": 2}).json()["id"])
    assert seen == [f"{JOB}:None"]


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK", "RGBA"])
def test_a_stored_request_comes_back_equal_images_included(mode: str) -> None:
    import numpy as np
    from PIL import Image

    from service.image_gate import GatedImage
    from service.serving.jobstore.codec import decode_request
    from service.serving.request import LoraRef

    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, len(mode)), dtype=np.uint8)
    image = Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode)
    request = GenerationRequest(
        prompt="a <lora:x:0.5> cat",
        seed=[1, 2**62],
        cfg_scale=7.25,
        loras=[LoraRef("style", 0.3)],
        init_image=GatedImage(image, "init_image"),
        sampler_options={"eta": 0.5, "solver_type": "heun"},
    )
    back = decode_request(encode_request(request))
    assert isinstance(back.init_image, GatedImage) and back.init_image.image.mode == mode
    assert np.array_equal(np.asarray(back.init_image.image), np.asarray(image))
    assert back.replace(init_image=None) == request.replace(init_image=None)


def test_one_process_per_state_dir(tmp_path: Path) -> None:
    from service.serving.jobstore.db import StateInUse

    first = StateDB(tmp_path)
    with pytest.raises(StateInUse, match="in use by another kdiff process"):
        StateDB(tmp_path)
    first.close()
    StateDB(tmp_path).close()  # released with the first


def test_a_store_that_cannot_record_answers_503_and_accepts_nothing(
    make_client: Callable[..., TestClient], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis unreachable or the state file's disk failing: the job is not accepted (no 500, no job left
    behind), the caller is told to retry, and the next request once the store answers succeeds."""
    with make_client(state_dir=tmp_path) as c:
        journal = c.app.state.service.journal  # type: ignore[attr-defined]
        real = journal.accepted

        async def failing(*args: Any, **kwargs: Any) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(journal, "accepted", failing)
        r = c.post("/jobs", json={"class_label": 2, "steps": 2})
        assert r.status_code == 503 and r.headers["Retry-After"] == "5"
        assert r.json()["detail"]["code"] == "store_unavailable" and "disk I/O error" in r.text
        assert [j["status"] for j in c.get("/jobs").json()] in ([], ["cancelled"])  # never run
        monkeypatch.setattr(journal, "accepted", real)
        assert (
            wait(c, c.post("/jobs", json={"class_label": 2, "steps": 2}).json()["id"])["status"]
            == "succeeded"
        )

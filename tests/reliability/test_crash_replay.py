"""kill -9 of a real `kdiff serve` with 40 accepted jobs queued or running: after a restart on the same
KDIFF_STATE_DIR every job succeeds once, with the images a clean run of its request makes (bit for
bit: batch-invariant mode, the default), results finished before the kill are still there, and keys
still isolate jobs. A corrupted state file stops the start-up with a clear message."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from service.api.app import create_app
from service.api.settings import Settings
from tests.support.server import REPO
from tests.support.sse import sse_events

from .support import AUTH1, AUTH2, AUTH_ADMIN, start

SAMPLERS = ["euler", "dpmpp_2m", "heun", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_sde"]
SLOW = {"KDIFF_MAX_BATCH_ROWS": "8", "KDIFF_INVARIANT_ROWS": "8"}  # one 8-row call per iteration


def body(i: int) -> dict[str, Any]:
    """Mixed samplers, n = 1..3, steps long enough that 40 of them are still running at the kill;
    every third request leaves its seed to the server (a replay must draw the same one)."""
    b: dict[str, Any] = {
        "sampler": SAMPLERS[i % len(SAMPLERS)],
        "steps": 50 + 10 * (i % 4),
        "n": 1 + i % 3,
        "class_label": i % 10,
    }
    if i % 3:
        b["seed"] = 1000 + 7 * i
    return b


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def images(c: httpx.Client, job_id: str, headers: dict[str, str], n: int) -> list[bytes]:
    return [c.get(f"/jobs/{job_id}/images/{k}", headers=headers).content for k in range(n)]


def wait_all(c: httpx.Client, ids: list[str], headers: dict[str, str], timeout: float) -> dict[str, dict]:
    deadline, views = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        views = {i: c.get(f"/jobs/{i}", headers=headers).json() for i in ids}
        if all(v["status"] in ("succeeded", "failed", "cancelled") for v in views.values()):
            return views
        time.sleep(0.2)
    raise AssertionError({i: v["status"] for i, v in views.items()})


def test_kill_9_with_40_jobs_queued_or_running_then_restart(reliability_store: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {"KDIFF_STATE_DIR": str(state), **SLOW}
    first = start(reliability_store, tmp_path / "first.log", **env)
    try:
        with httpx.Client(base_url=first.url, timeout=30) as c:
            # finished before the kill: must still be readable afterwards, byte for byte
            early = {}
            for k in range(3):
                r = c.post("/jobs", json={"class_label": k, "steps": 3, "n": 2, "seed": k}, headers=AUTH1)
                early[r.json()["id"]] = None
            for job_id, view in wait_all(c, list(early), AUTH1, 30).items():
                assert view["status"] == "succeeded", view
                early[job_id] = images(c, job_id, AUTH1, 2)
            # 40 accepted jobs, two keys; the kill comes right after the last 202
            owners: dict[str, dict[str, str]] = {}
            bodies: dict[str, dict[str, Any]] = {}

            def accept(i: int) -> tuple[str, dict[str, str]]:
                headers = AUTH1 if i % 2 else AUTH2
                r = c.post("/jobs", json=body(i), headers=headers)
                assert r.status_code == 202, r.text
                return r.json()["id"], headers

            with ThreadPoolExecutor(8) as pool:  # accepted within a fraction of the first job's run
                for i, (job_id, headers) in enumerate(pool.map(accept, range(40))):
                    owners[job_id], bodies[job_id] = headers, body(i)
            states = [
                j["status"] for j in c.get("/jobs?limit=1000", headers=AUTH_ADMIN).json() if j["id"] in bodies
            ]
    finally:
        first.proc.kill()  # SIGKILL: no drain, no shutdown hook
        first.stop()
    assert len(states) == 40 and set(states) <= {"queued", "running"}, states

    second = start(reliability_store, tmp_path / "second.log", **env)
    try:
        with httpx.Client(base_url=second.url, timeout=30) as c:
            some = next(iter(bodies))  # /events works for a job accepted before the restart
            with httpx.Client(base_url=second.url, headers=owners[some], timeout=120) as sse:
                events = [e for e, _ in sse_events(sse, f"/jobs/{some}/events")]
            assert events[-1] == "done", events
            views = {}
            for headers in (AUTH1, AUTH2):
                mine = [i for i, h in owners.items() if h is headers]
                views |= wait_all(c, mine, headers, 120)
            assert all(v["status"] == "succeeded" for v in views.values()), views
            # none lost, none duplicated, keys still isolate
            for headers, other in ((AUTH1, AUTH2), (AUTH2, AUTH1)):
                listed = [j["id"] for j in c.get("/jobs?limit=1000", headers=headers).json()]
                mine = {i for i, h in owners.items() if h is headers}
                assert len(listed) == len(set(listed)) and mine <= set(listed)
                assert not ({i for i, h in owners.items() if h is other} & set(listed))
                assert c.get(f"/jobs/{next(iter(mine))}", headers=other).status_code == 404
            for job_id, pngs in early.items():
                assert images(c, job_id, AUTH1, 2) == pngs

            # each image equals a clean run of the same request (the server drew the missing seeds)
            def clean_run(job_id: str) -> dict[str, Any]:
                b = {**bodies[job_id], "seed": views[job_id]["result"]["seeds"]}
                return dict(c.post("/sample", json=b, headers=owners[job_id]).json())

            with ThreadPoolExecutor(8) as pool:
                clean = dict(zip(views, pool.map(clean_run, views), strict=True))
            for job_id, view in views.items():
                result, b = view["result"], bodies[job_id]
                assert len(result["images"]) == b["n"]
                if "seed" in b:
                    assert result["seeds"] == [b["seed"] + k for k in range(b["n"])]
                for got, want in zip(result["images"], clean[job_id]["images"], strict=True):
                    np.testing.assert_array_equal(pixels(_b64(got)), pixels(_b64(want)), err_msg=job_id)
    finally:
        second.stop()


def _b64(text: str) -> bytes:
    return base64.b64decode(text)


def test_a_corrupted_state_file_stops_start_up_unless_reset_is_asked(
    reliability_store: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.sqlite3").write_bytes(b"not a database, " * 512)
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", "0", "--log-level", "warning"]
    env = {"KDIFF_MODEL_STORE": str(reliability_store), "KDIFF_STATE_DIR": str(state)}
    run = subprocess.run(
        cmd, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 2, run.stderr
    assert "corrupted" in run.stderr and "KDIFF_STATE_RESET=1" in run.stderr and "Traceback" not in run.stderr
    assert (state / "state.sqlite3").read_bytes().startswith(b"not a database")  # left as it was
    # asked to: the bad file is set aside, the service starts with an empty store
    settings = Settings(
        model_store=reliability_store, state_dir=str(state), state_reset=True, torch_threads=1
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/jobs").json() == []
    assert list(state.glob("state.sqlite3.corrupt-*")), list(state.iterdir())

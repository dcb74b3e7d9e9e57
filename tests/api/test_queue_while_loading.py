"""The queue bound holds while a model loads. `POST /jobs` for a model not loaded yet returns at once
and the job waits for the load; before, nothing counted those jobs, so a caller could queue any
number of them during a load (minutes for a large checkpoint), each a task and a job in memory, and
all past KDIFF_MAX_QUEUE then failed as `internal` errors when the load ended. Now they count
against the model's queue: past it, 429 with Retry-After, as for a loaded model."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.settings import Settings
from service.models.store import LoadedModel, ModelStore
from tests.support.sse import sse_events
from tests.support.tiny_store import make_tiny_store

MAX_QUEUE = 4


def test_jobs_waiting_for_a_load_count_against_the_queue(tmp_path: Path) -> None:
    make_tiny_store(tmp_path, name="a")
    make_tiny_store(tmp_path, name="b", seed=1)
    store = ModelStore(tmp_path)
    gate = threading.Event()
    original = store.load

    def slow(name: str, device: Any = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
        gate.wait(20)  # "b" loads only when the test says so
        return original(name, device, dtype)

    store.load = slow  # type: ignore[method-assign]
    gate.set()  # "a" preloads
    settings = Settings(
        model_store=tmp_path, models=["a"], torch_threads=1, batch_wait_ms=0, max_queue=MAX_QUEUE
    )
    with TestClient(create_app(settings, store)) as c:
        gate.clear()
        body = {"model": "b", "class_label": 3, "steps": 2}
        answers = [c.post("/jobs", json={**body, "seed": i}) for i in range(3 * MAX_QUEUE)]
        codes = [r.status_code for r in answers]
        assert codes == [202] * MAX_QUEUE + [429] * (2 * MAX_QUEUE), codes
        assert int(answers[-1].headers["Retry-After"]) >= 1
        assert "queue is full" in answers[-1].json()["detail"]
        gate.set()
        for r in answers[:MAX_QUEUE]:  # every accepted job runs once the model is there
            assert sse_events(c, f"/jobs/{r.json()['id']}/events")[-1][0] == "done"
        assert c.post("/jobs", json=body).status_code == 202  # room again

"""A progress preview is rendered once per job and step however many clients ask for it at once:
hundreds of SSE subscribers (`?preview=true`), A1111 `/progress` pollers and ComfyUI sockets on one
job each ask on every step. Before, every caller that missed the cache rendered its own copy in a
worker thread (a VAE decode on latent models), so N subscribers made N renders per step and queued
them in the default thread pool that image decoding and result encoding share."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from service.serving import service as service_module
from tests.support.app_client import app_client
from tests.support.tiny_store import make_tiny_store

LONG = {"class_label": 3, "steps": 10_000, "sampler": "euler", "seed": 1}


def _running_job(client: Any, state: Any) -> Any:
    job = state.jobs.get(client.post("/jobs", json=LONG).json()["id"])
    deadline = time.monotonic() + 30
    while state.preview(job) is None:  # its first step done: a prediction to preview
        assert time.monotonic() < deadline, "the job never produced a prediction"
        time.sleep(0.01)
    return job


def test_concurrent_preview_requests_share_one_render(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    renders: list[int] = []
    lock = threading.Lock()
    real = service_module.render

    def counting(model: Any, latest: Any, max_side: int) -> str:
        with lock:
            renders.append(max_side)
        time.sleep(0.05)  # a render takes a while (a VAE decode): the callers overlap it
        return str(real(model, latest, max_side))

    monkeypatch.setattr(service_module, "render", counting)
    with app_client(make_tiny_store(tmp_path), 0, max_steps=10_000) as client:
        state = client.app.state.service  # type: ignore[attr-defined]
        job = _running_job(client, state)

        async def together(n: int) -> tuple[list[str | None], list[str | None]]:
            # on the app's loop, all started in one go: they ask for the same (job, step) preview
            # (at most a step may pass between two of them: the engine runs beside them)
            first = list(await asyncio.gather(*(state.preview_png(job, 64) for _ in range(n))))
            waiter = asyncio.ensure_future(state.preview_png(job, 32))
            others = asyncio.gather(*(state.preview_png(job, 32) for _ in range(5)))
            await asyncio.sleep(0)
            waiter.cancel()  # a subscriber that goes away does not cancel the render the others wait for
            return first, list(await others)

        first, others = client.portal.call(together, 50)  # type: ignore[attr-defined]
        client.delete(f"/jobs/{job.id}")
    assert all(png is not None for png in first)
    assert renders.count(64) <= 2, f"{renders.count(64)} renders for 50 concurrent requests of one preview"
    assert renders.count(32) <= 2 and all(png is not None for png in others)

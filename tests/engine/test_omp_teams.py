"""OpenMP worker teams (service/engine/omp_teams.py): work off the engine thread gives its team back,
so the engine's own team is never throttled by libgomp. Measured in a fresh interpreter each (libgomp
reads its settings once): the worker threads a loader thread leaves behind, and how often the engine
thread's workers fall asleep while it runs many short parallel regions, as a model call does."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from service.engine import omp_teams
from service.engine.omp_teams import TeamReleasingExecutor, release_team

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, os, sys, time
from concurrent.futures import ThreadPoolExecutor
import torch
from service.engine.omp_teams import TeamReleasingExecutor

torch.set_num_threads(max(2, os.cpu_count() or 1))  # each team then fills the machine: two overfill it
tasks = lambda: len(os.listdir("/proc/self/task"))
def region():  # one parallel region (torch splits 256k elements across its threads)
    torch.ones(1 << 18).exp_()
def switches():
    total = 0
    for tid in os.listdir("/proc/self/task"):
        for line in open(f"/proc/self/task/{tid}/status"):
            if line.startswith("voluntary_ctxt_switches"):
                total += int(line.split()[1])
    return total
def engine():  # short regions with Python between them (a traced call's gaps, a sampler's steps)
    for _ in range(50):
        region()
    before = switches()
    for _ in range(1000):
        region()
        t = time.perf_counter()
        while time.perf_counter() - t < 50e-6:  # longer than a throttled spin, far shorter than a full one
            pass
    return switches() - before

loader = (TeamReleasingExecutor if sys.argv[1] == "release" else ThreadPoolExecutor)(1)
loader.submit(lambda: None).result()
base = tasks()
loader.submit(region).result()  # loading and tracing a model
after_load = tasks()
sleeps = ThreadPoolExecutor(1).submit(engine).result()
print(json.dumps({"base": base, "after_load": after_load, "sleeps": sleeps}))
"""


def _run(mode: str) -> dict[str, int]:
    env = {**os.environ, "OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}  # as `kdiff` sets them
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through Linux's /proc")
def test_a_released_loader_team_leaves_the_engine_team_unthrottled() -> None:
    kept, released = _run("keep"), _run("release")
    # a plain pool's thread keeps its workers, and the engine's workers then sleep between regions
    assert kept["after_load"] > kept["base"], kept
    assert kept["sleeps"] > 300, kept
    # released: no worker left behind, and the engine's workers spin through the gaps instead
    assert released["after_load"] == released["base"], released
    assert released["sleeps"] * 5 < kept["sleeps"], (released, kept)


def test_release_is_harmless_without_a_team_and_the_executor_keeps_results() -> None:
    assert release_team() in (True, False)  # this thread may have no team: nothing to free
    if omp_teams._pause_all() is not None:
        assert release_team()

    def boom() -> None:
        raise ValueError("x")

    with TeamReleasingExecutor(1) as pool:
        assert pool.submit(lambda a, b=0: a + b, 2, b=3).result() == 5
        with pytest.raises(ValueError):
            pool.submit(boom).result()


def test_the_serving_loop_runs_to_thread_work_in_a_releasing_pool(tmp_path: Path) -> None:
    """Service.startup installs it as the loop's default executor (asyncio.to_thread's)."""
    from service.api.settings import Settings
    from service.serving.service import Service
    from tests.support.tiny_store import make_tiny_store

    store = make_tiny_store(tmp_path)
    seen: list[str] = []

    async def main() -> None:
        service = Service(Settings(model_store=store, models=["tiny"], torch_threads=1, batch_wait_ms=0))
        await service.startup()
        try:
            loop = asyncio.get_running_loop()
            assert isinstance(loop._default_executor, TeamReleasingExecutor)  # type: ignore[attr-defined]
            calls: list[bool] = []
            real = omp_teams.release_team
            omp_teams.release_team = lambda: calls.append(True) or real()  # type: ignore[assignment, func-returns-value]
            try:
                await asyncio.to_thread(lambda: seen.append(threading.current_thread().name))
            finally:
                omp_teams.release_team = real  # type: ignore[assignment]
            assert calls == [True]
        finally:
            await service.shutdown()

    asyncio.run(main())
    assert seen and seen[0].startswith("kdiff-worker")


def test_an_engine_gives_its_team_back_when_it_goes_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    """While jobs run it keeps the team (a new one per call would cost thread starts); idle, it frees it."""
    from service.engine import engine as engine_module
    from tests.support.engine_fakes import FakeDenoiser, make_engine, request, run

    released: list[str] = []
    on_thread = lambda: released.append(threading.current_thread().name)  # noqa: E731
    monkeypatch.setattr(engine_module, "release_team", on_thread)

    async def go() -> list[str]:
        engine = make_engine(FakeDenoiser())
        engine.start()
        await asyncio.sleep(0.05)  # idle from the start: nothing of ours to free yet, still harmless
        before = len(released)
        job = engine.submit(request(steps=6))
        await job.wait_done()
        for _ in range(100):
            if len(released) > before:
                break
            await asyncio.sleep(0.01)
        await engine.stop()
        return released[before:]

    after_job = run(go)
    assert after_job and all(name.startswith("engine-fake") for name in after_job), after_job

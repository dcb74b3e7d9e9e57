"""Cancel, deadlines, failure isolation, NaN, admission limits and drain."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import torch

from service.engine import Draining, ImageResult, JobStatus, JobStore, Mode, QueueFull
from tests.support.engine_fakes import (
    FAIL_LABEL,
    NAN_LABEL,
    FakeDenoiser,
    make_engine,
    reference,
    request,
    run,
)


def test_cancel_frees_rows_at_the_next_iteration() -> None:
    model = FakeDenoiser(delay_s=0.003)

    async def go() -> tuple:
        engine = make_engine(model)
        engine.start()
        victim = engine.submit(request("euler", 200, seeds=[1, 2, 3]))
        keeper = engine.submit(request("euler", 30, seeds=[4]))
        while victim.progress.evals < 3:
            await asyncio.sleep(0.001)
        engine.cancel(victim)
        calls_at_cancel = len(model.calls)
        await asyncio.gather(victim.wait_done(), keeper.wait_done())
        await engine.stop()
        return victim, keeper, calls_at_cancel

    victim, keeper, at_cancel = run(go)
    assert victim.status == JobStatus.cancelled and keeper.status == JobStatus.succeeded
    # at most the call in flight at cancel time still carried the victim's rows
    assert all(rows == 1 for rows in model.calls[at_cancel + 1 :])
    assert len(model.calls) == 30


@pytest.mark.parametrize("end", ["cancel", "deadline"])
def test_request_mode_releases_finished_jobs_when_the_rest_of_the_batch_is_dropped(end: str) -> None:
    """Request batching holds a finished job until its batch ends; a batch that ends by cancel or
    deadline (not by finishing) must still release it."""
    model = FakeDenoiser(delay_s=0.002)

    short_req = request("euler", 3, seeds=[1])  # a finished job drops its tensors: keep the request

    async def go() -> tuple:
        engine = make_engine(model, mode=Mode.request)
        engine.start()
        short = engine.submit(short_req)
        long = engine.submit(request("euler", 1000, seeds=[2], timeout_s=0.3 if end == "deadline" else 60))
        while short.t_computed is None:
            await asyncio.sleep(0.001)
        assert not short.status.finished  # held for the batch
        if end == "cancel":
            engine.cancel(long)
        await asyncio.wait_for(asyncio.gather(short.wait_done(), long.wait_done()), 10)
        await engine.stop()
        return short, long

    short, long = run(go)
    assert short.status == JobStatus.succeeded
    assert long.status == (JobStatus.cancelled if end == "cancel" else JobStatus.failed)
    torch.testing.assert_close(short.result, reference(FakeDenoiser(), short_req), atol=1e-5, rtol=0)


def test_cancel_of_a_queued_job_is_immediate() -> None:
    async def go() -> JobStatus:
        engine = make_engine(FakeDenoiser())  # not started: the job stays queued
        job = engine.submit(request())
        engine.cancel(job)
        assert engine.queue_position(job) is None
        await engine.stop()
        return job.status

    assert run(go) == JobStatus.cancelled


def test_deadline_fails_running_and_queued_jobs() -> None:
    model = FakeDenoiser(delay_s=0.005)

    async def go() -> tuple:
        engine = make_engine(model, max_batch_rows=1)
        engine.start()
        slow = engine.submit(request("euler", 500, timeout_s=0.2))
        queued = engine.submit(request("euler", 5, seeds=[7], timeout_s=0.1))
        await asyncio.gather(slow.wait_done(), queued.wait_done())
        await engine.stop()
        return slow, queued

    slow, queued = run(go)
    for job in (slow, queued):
        assert job.status == JobStatus.failed and job.error is not None
        assert job.error.code == "deadline_exceeded"
    assert queued.t_started is None  # it expired in the queue, before reaching the model
    assert len(model.calls) < 100


def test_failing_batched_call_is_retried_job_by_job() -> None:
    model = FakeDenoiser()
    good = [request("dpmpp_2m", 8, seeds=[i], label=i) for i in range(3)]
    bad = request("dpmpp_2m", 8, seeds=[99], label=FAIL_LABEL)

    async def go() -> list:
        engine = make_engine(model)
        engine.start()
        jobs = [engine.submit(r) for r in [good[0], bad, *good[1:]]]
        await asyncio.gather(*(j.wait_done() for j in jobs))
        await engine.stop()
        return jobs

    jobs = run(go)
    culprit = jobs[1]
    assert culprit.status == JobStatus.failed and culprit.error is not None
    assert culprit.error.code == "model_error" and "simulated CUDA error" in culprit.error.message
    for job, req in zip((jobs[0], *jobs[2:]), good, strict=True):
        assert job.status == JobStatus.succeeded
        torch.testing.assert_close(job.result, reference(FakeDenoiser(), req), atol=1e-5, rtol=0)


class SmallDevice(FakeDenoiser):
    """Runs out of memory above ``limit`` rows per call, as a GPU would."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __call__(
        self, x: torch.Tensor, sigma: torch.Tensor, class_cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        if x.shape[0] > self.limit:
            self.calls.append(-x.shape[0])  # a failed call
            raise torch.OutOfMemoryError(f"tried to allocate {x.shape[0]} rows")
        return super().__call__(x, sigma, class_cond)


def _run_all(model: Any, reqs: list, **engine_options: Any) -> tuple[list, Any]:
    """Run ``reqs`` to the end on an engine over ``model`` (64 rows per call at most); the jobs and
    the engine's ModelRunner, whose call size the out-of-memory tests read afterwards."""

    async def go() -> tuple[list, Any]:
        engine = make_engine(model, max_batch_rows=64, **engine_options)
        engine.start()
        jobs = [engine.submit(r) for r in reqs]
        await asyncio.gather(*(j.wait_done() for j in jobs))
        await engine.stop()
        return jobs, engine.runner

    return run(go)


def test_out_of_memory_halves_the_rows_per_call_and_the_jobs_still_succeed() -> None:
    model = SmallDevice(limit=5)
    reqs = [request("dpmpp_2m", 4, seeds=list(range(8)), cfg=3.0), request("euler", 4, seeds=[9, 10])]

    jobs, runner = _run_all(model, reqs)
    rows = runner.max_rows
    assert [j.status for j in jobs] == [JobStatus.succeeded] * 2, [j.error for j in jobs]
    assert rows == 4  # 16 guided + 2 rows = 18 -> 9 (still too many) -> 4, then kept
    assert [c for c in model.calls if c < 0] == [-18, -9]  # only the first iteration's call failed
    assert max(model.calls) == 4
    for job, req in zip(jobs, reqs, strict=True):
        torch.testing.assert_close(job.result, reference(FakeDenoiser(), req), atol=1e-5, rtol=0)


def test_out_of_memory_in_batch_invariant_mode_halves_the_fixed_call_size() -> None:
    model = SmallDevice(limit=5)
    reqs = [request("dpmpp_2m", 4, seeds=list(range(5)), cfg=3.0), request("euler", 4, seeds=[9])]

    jobs, runner = _run_all(model, reqs, invariant_rows=8)
    chunk = runner.chunk_rows
    assert [j.status for j in jobs] == [JobStatus.succeeded] * 2, [j.error for j in jobs]
    assert chunk == 4 and [c for c in model.calls if c < 0] == [-8]  # 8 rows failed once, then 4
    assert set(c for c in model.calls if c > 0) == {4}  # 11 rows: three calls of exactly 4, padded
    for job, req in zip(jobs, reqs, strict=True):
        torch.testing.assert_close(job.result, reference(FakeDenoiser(), req), atol=1e-5, rtol=0)


def test_out_of_memory_on_a_single_row_fails_only_that_job() -> None:
    model = SmallDevice(limit=0)

    async def go() -> object:
        engine = make_engine(model)
        engine.start()
        job = engine.submit(request("euler", 3))
        await job.wait_done()
        await engine.stop()
        return job

    job = run(go)
    assert job.status == JobStatus.failed and "OutOfMemoryError" in job.error.message


def test_nan_output_fails_that_job_naming_step_and_sigma() -> None:
    async def go() -> list:
        engine = make_engine(FakeDenoiser())
        engine.start()
        jobs = [engine.submit(request("euler", 6, label=NAN_LABEL)), engine.submit(request("euler", 6))]
        await asyncio.gather(*(j.wait_done() for j in jobs))
        await engine.stop()
        return jobs

    nan_job, ok = run(go)
    assert ok.status == JobStatus.succeeded
    assert nan_job.status == JobStatus.failed and nan_job.error is not None
    assert nan_job.error.code == "non_finite"
    assert "step 0" in nan_job.error.message and "sigma=20" in nan_job.error.message


def test_bad_request_fails_only_that_job() -> None:
    async def go() -> list:
        engine = make_engine(FakeDenoiser())
        engine.start()
        bad = request("euler", 4)
        bad.init = torch.zeros(1, 1, 5, 5)  # does not fit the 4x4 latent
        jobs = [engine.submit(bad), engine.submit(request("euler", 4))]
        await asyncio.gather(*(j.wait_done() for j in jobs))
        await engine.stop()
        return jobs

    bad, ok = run(go)
    assert ok.status == JobStatus.succeeded
    assert bad.status == JobStatus.failed and bad.error is not None
    assert bad.error.code == "invalid_input" and "could not start sampling" in bad.error.message


def test_full_queue_rejects_with_retry_after() -> None:
    async def go() -> QueueFull:
        engine = make_engine(FakeDenoiser(), max_queue=2)
        engine.submit(request())
        engine.submit(request())
        with pytest.raises(QueueFull) as info:
            engine.submit(request())
        await engine.stop()
        return info.value

    err = run(go)
    assert err.retry_after_s >= 1


def test_drain_finishes_running_jobs_and_refuses_new_ones() -> None:
    model = FakeDenoiser(delay_s=0.002)

    async def go() -> tuple:
        engine = make_engine(model)
        engine.start()
        jobs = [engine.submit(request("euler", 20, seeds=[i])) for i in range(3)]
        drain = asyncio.create_task(engine.drain(timeout_s=10))
        await asyncio.sleep(0.01)
        with pytest.raises(Draining):
            engine.submit(request())
        await drain
        return jobs

    jobs = run(go)
    assert [j.status for j in jobs] == [JobStatus.succeeded] * 3


def test_drain_timeout_fails_leftover_jobs() -> None:
    async def go():
        engine = make_engine(FakeDenoiser(delay_s=0.01))
        engine.start()
        job = engine.submit(request("euler", 1000))
        await engine.drain(timeout_s=0.1)
        return job

    job = run(go)
    assert job.status == JobStatus.failed and job.error is not None and job.error.code == "shutdown"


def test_job_store_drops_finished_jobs_after_ttl_and_over_cap() -> None:
    async def go() -> None:
        store = JobStore(ttl_s=10.0, max_finished=2)
        jobs = [make_engine(FakeDenoiser()).submit(request()) for _ in range(4)]
        for job in jobs:
            store.add(job)
        now = time.monotonic()
        for i, job in enumerate(jobs[:3]):
            job.finish(JobStatus.succeeded, result=i)
            job.t_finished = now - 5 + i
        assert store.get(jobs[0].id) is None  # over the cap: the oldest finished job goes
        assert store.get(jobs[1].id) is not None
        jobs[1].t_finished = now - 11  # past its 10 s TTL
        assert [j.id for j in store.list()] == [jobs[2].id, jobs[3].id]  # the unfinished job stays
        assert len(store) == 2

    run(go)


def test_job_store_keeps_results_within_a_byte_budget() -> None:
    async def go() -> None:
        store = JobStore(ttl_s=100.0, max_finished=100, max_bytes=2500)
        jobs = [make_engine(FakeDenoiser()).submit(request()) for _ in range(4)]
        for i, job in enumerate(jobs):
            store.add(job)
            job.finish(JobStatus.succeeded, result=ImageResult([b"x" * 1000], [i], {}))
            job.t_finished = time.monotonic() + i
        # 4,000 bytes of results in a 2,500-byte budget: the two oldest go
        assert [j.id for j in store.list()] == [jobs[2].id, jobs[3].id]
        assert store.result_bytes == 2000

    run(go)


def test_a_finished_job_keeps_no_tensors() -> None:
    """A kept result must not pin the conditioning, the start image or a view of a batched output."""

    async def go() -> None:
        engine = make_engine(FakeDenoiser())
        engine.start()
        job = engine.submit(request("euler", 5, seeds=[1, 2]))
        await job.wait_done()
        await engine.stop()
        assert job.status == JobStatus.succeeded
        assert engine.preview(job) is None and job not in engine._drivers
        held = [v for v in vars(job.request).values() if isinstance(v, torch.Tensor)]
        held += [t for d in (job.request.cond, job.request.uncond or {}) for t in d.values()]
        assert held == []
        assert job.request.spec.steps == 5  # what the result view and PNG parameters still read

    run(go)

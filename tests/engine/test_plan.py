"""The iteration plan as a value: built from a scheduler state without running a model, run by the
executor, and dumped to the log when a model call fails."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import torch

from service.engine import ErrorCode, JobError, JobStatus, Metrics, Mode, ModelRunner, Scheduler
from service.engine.executor import Executor, start_job
from service.engine.jobs import Job, JobRequest
from service.sampling.driver import Driver
from tests.support.engine_fakes import FAIL_LABEL, FakeDenoiser, handle, make_engine, reference, request, run


def _running(model: FakeDenoiser, reqs: list[JobRequest]) -> dict[Job, Driver]:
    """A scheduler state: running jobs (oldest first) and their started drivers; no model call made."""
    h = handle(model)
    return {Job(r, "fake"): start_job(r, h) for r in reqs}


def test_plan_is_built_from_the_running_jobs_without_calling_the_model() -> None:
    model = FakeDenoiser()
    big = request("euler", 10, seeds=[1, 2], cfg=3.0)  # 4 rows: guided
    plain = request("heun", 5, seeds=[3])  # 1 row
    unconditioned = request("euler", 10, seeds=[4], label=None)  # no class_cond: a call of its own
    tall = request("euler", 10, seeds=[5])
    tall.latent_shape = (1, 8, 4)  # another latent size: a call of its own
    adaptive = request("dpm_adaptive", 10, seeds=[6, 7])  # batch-coupled: one track per image
    oversized = request("euler", 10, seeds=list(range(10, 13)), cfg=2.0)  # 6 rows > max_rows
    drivers = _running(model, [big, plain, unconditioned, tall, adaptive, oversized])
    ids = [job.id for job in drivers]

    plan = Scheduler(Mode.iteration, max_rows=5).plan(drivers, 7)

    assert model.calls == []  # planning ran no model
    shape = (1, 4, 4)
    described = [
        (c.row_shape, c.cond, [(s.job_id, s.track_index, s.rows) for s in c.slots]) for c in plan.calls
    ]
    assert described == [
        # class-conditioned 1x4x4 rows, oldest first, packed to 5 rows; the oversized job goes alone
        (shape, ("class_cond",), [(ids[0], 0, 4), (ids[1], 0, 1)]),
        (shape, ("class_cond",), [(ids[4], 0, 1), (ids[4], 1, 1)]),
        (shape, ("class_cond",), [(ids[5], 0, 6)]),
        (shape, (), [(ids[2], 0, 1)]),
        ((1, 8, 4), ("class_cond",), [(ids[3], 0, 1)]),
    ]
    assert [c.rows for c in plan.calls] == [5, 2, 6, 1, 1] and plan.rows == 15
    assert plan.iteration == 7 and list(plan.drivers) == list(drivers)
    # it logs as plain JSON: job ids, tracks, rows, each evaluation's step and sigma, the sampler
    dumped = json.loads(str(plan))
    assert dumped["iteration"] == 7 and dumped["max_rows"] == 5 and dumped["jobs"] == ids
    first = dumped["calls"][0]["slots"][0]
    assert first == {
        "job": ids[0],
        "track": 0,
        "rows": 4,
        "step": 0,
        "sigma": pytest.approx(float(drivers[next(iter(drivers))].sigmas[0]), abs=1e-5),
        "sampler": "euler",
    }
    assert model.calls == []


def test_a_finished_driver_is_in_the_plan_but_in_no_call() -> None:
    model = FakeDenoiser()
    drivers = _running(model, [request("euler", 1, seeds=[1]), request("euler", 3, seeds=[2])])
    done_job = next(iter(drivers))
    driver = drivers[done_job]
    x, sigma, cond = driver.inputs(driver.tracks[0])
    driver.feed(driver.tracks[0], model(x, sigma, **cond))  # its only step
    assert driver.done
    plan = Scheduler(Mode.iteration, 8).plan(drivers)
    assert done_job in plan.drivers
    assert [s.job for c in plan.calls for s in c.slots] == [list(drivers)[1]]


def test_executor_runs_plans_to_the_same_images_as_direct_sampling() -> None:
    """The scheduler -> plan -> executor loop, driven by hand (no engine, no event loop)."""
    model = FakeDenoiser()
    reqs = [request("dpmpp_2m", 6, seeds=[1], cfg=2.0), request("euler_ancestral", 4, seeds=[2, 3])]
    drivers = _running(model, reqs)
    jobs = list(drivers)
    h = handle(model)
    scheduler, executor = Scheduler(Mode.iteration, 64), Executor(h, ModelRunner(h, 64), Metrics())
    images: dict[Job, torch.Tensor] = {}
    iteration = 0
    while drivers:
        plan = scheduler.plan(drivers, iteration)
        for out in executor.step(plan):
            assert out.error is None
            if out.images is not None:
                images[out.job] = out.images
                del drivers[out.job]
        iteration += 1
    assert iteration == 6 and model.calls == [4] * 4 + [2] * 2  # shared calls until the short job left
    for job, req in zip(jobs, reqs, strict=True):
        torch.testing.assert_close(images[job], reference(FakeDenoiser(), req), atol=1e-5, rtol=0)


def test_a_failing_model_call_logs_its_plan(caplog: pytest.LogCaptureFixture) -> None:
    model = FakeDenoiser()
    good = request("euler", 4, seeds=[1], label=2)
    bad = request("euler", 4, seeds=[2], label=FAIL_LABEL)

    async def go() -> list[Job]:
        engine = make_engine(model)
        engine.start()
        jobs = [engine.submit(good), engine.submit(bad)]
        await asyncio.gather(*(j.wait_done() for j in jobs))
        await engine.stop()
        return jobs

    with caplog.at_level(logging.WARNING, logger="service.engine.executor"):
        ok, failed = run(go)
    assert ok.status == JobStatus.succeeded and failed.status == JobStatus.failed
    assert failed.error is not None and failed.error.code is ErrorCode.model_error
    # the owner learns where it failed, not which other jobs shared the call
    assert "(iteration 0, call 0)" in failed.error.message and ok.id not in failed.error.message
    records = [r.getMessage() for r in caplog.records]
    shared = next(m for m in records if "retrying job by job" in m)
    alone = next(m for m in records if f"failed for job {failed.id}" in m)
    plan = json.loads(shared.split("plan: ", 1)[1])
    assert plan["iteration"] == 0 and plan["jobs"] == [ok.id, failed.id]
    assert [s["job"] for s in plan["calls"][0]["slots"]] == [ok.id, failed.id]
    assert json.loads(alone.split("plan: ", 1)[1])["iteration"] == 0


def test_error_codes_are_one_closed_list() -> None:
    assert JobError("model_error", "x").code is ErrorCode.model_error  # a string is converted
    assert json.dumps({"code": ErrorCode.non_finite}) == '{"code": "non_finite"}'
    with pytest.raises(ValueError):
        JobError("no_such_code", "x")


def test_batch_inputs_equal_each_tracks_inputs_concatenated() -> None:
    """The executor's one-op-per-tensor gather (``batch_inputs``) gives bit for bit the rows of each
    track's ``inputs`` concatenated in order: guided tracks of two images (x twice, cond then uncond
    rows), a batch-coupled job's per-image tracks (slices of its conditioning), one-image tracks whose
    conditioning is handed whole, a float64 sigma in a float32 call, and the sigmas a step later."""
    from service.sampling.driver import batch_inputs

    model = FakeDenoiser()
    reqs = [
        request("euler", 10, seeds=[1, 2], cfg=3.0),
        request("heun", 5, seeds=[3]),
        request("dpm_adaptive", 10, seeds=[6, 7], cfg=2.0),
        request("dpmpp_2m", 8, seeds=[8], cfg=1.5),
        request("euler_ancestral", 6, seeds=[9, 10]),
    ]
    drivers = _running(model, reqs)
    for _ in range(2):
        pairs = [(d, t) for d in drivers.values() for t in d.tracks if t.pending is not None]
        x, sigma, cond = batch_inputs(pairs)
        each = [d.inputs(t) for d, t in pairs]
        assert torch.equal(x, torch.cat([e[0] for e in each]))
        assert sigma.dtype == x.dtype and torch.equal(sigma, torch.cat([e[1] for e in each]))
        assert list(cond) == ["class_cond"]
        assert torch.equal(cond["class_cond"], torch.cat([e[2]["class_cond"] for e in each]))
        assert x.shape[0] == sum(d.rows(t) for d, t in pairs) == 4 + 1 + 4 + 2 + 2
        out = model(x, sigma, **cond)
        offset = 0
        for d, t in pairs:
            d.feed(t, out[offset : offset + d.rows(t)])
            offset += d.rows(t)
    # a sigma of another dtype (a float64 schedule) is cast to the rows' dtype, as inputs() casts it
    d, t = next((d, t) for d in drivers.values() for t in d.tracks)
    assert t.pending is not None
    t.pending = t.pending._replace(sigma=t.pending.sigma.double() + 1e-9)
    x, sigma, _ = batch_inputs([(d, t)])
    assert sigma.dtype == torch.float32 and torch.equal(sigma, d.inputs(t)[1])


def test_batch_inputs_refuse_tracks_with_other_conditioning_keys() -> None:
    from service.sampling.driver import batch_inputs

    drivers = _running(FakeDenoiser(), [request("euler", 5, seeds=[1]), request("euler", 5, label=None)])
    pairs = [(d, d.tracks[0]) for d in drivers.values()]
    with pytest.raises(ValueError, match="conditioning keys differ"):
        batch_inputs(pairs)


def test_a_driver_whose_conditioning_is_replaced_is_grouped_by_the_new_one() -> None:
    """The scheduler reads a driver's conditioning signature once per conditioning dict (a second
    pass replaces the dict whole): a replaced dict is read again, and a finished driver's entry goes."""
    import gc

    model = FakeDenoiser()
    drivers = _running(model, [request("euler", 5, seeds=[1]), request("euler", 5, seeds=[2])])
    scheduler = Scheduler(Mode.iteration, 8)
    assert len(scheduler.plan(drivers).calls) == 1
    second = list(drivers.values())[1]
    second.cond = {"class_cond": torch.full([1], 3), "extra": torch.zeros(1, 2)}  # as a new pass sets it
    plan = scheduler.plan(drivers)
    assert [c.cond for c in plan.calls] == [("class_cond",), ("class_cond", "extra")]
    assert len(scheduler._cond_keys) == 2
    del drivers, second, plan
    gc.collect()
    assert len(scheduler._cond_keys) == 0


def test_a_change_event_is_set_at_the_next_change_whoever_took_it_when() -> None:
    """notify() replaces the change event only when someone took it: an event taken before a change
    is set by it, one taken after an unwatched change by the next, and the end sets the done event."""

    async def go() -> None:
        job = Job(request("euler", 3), "fake")
        first = job.change_event()
        job.notify()
        assert first.is_set()
        job.notify()  # nobody watching: nothing to set
        late = job.change_event()
        assert not late.is_set() and late is not first
        job.notify()
        assert late.is_set()
        again = job.change_event()
        job.finish(JobStatus.succeeded)
        assert again.is_set()
        await asyncio.wait_for(job.wait_done(), 1)

    asyncio.run(go())

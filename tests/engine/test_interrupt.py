"""Interrupt (A1111's /interrupt): a running job stopped with ``keep_partial`` ends cancelled with its
images as they stand, each unfinished image's latest denoised prediction, as A1111 returns them."""

from __future__ import annotations

import asyncio

import torch

from service.engine import JobStatus
from service.engine.executor import start_job
from service.sampling.driver import drive
from tests.support.engine_fakes import FakeDenoiser, handle, make_engine, request, run


def _partial_after(req_factory, evals: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The reference: a fresh driver of the same request fed ``evals`` evaluations, then ``partial()``."""
    model = FakeDenoiser()
    driver = start_job(req_factory(), handle(model))
    for _ in range(evals):
        (track,) = driver.pending()
        x, sigma, cond = driver.inputs(track)
        driver.feed(track, model(x, sigma, **cond))
    return driver.partial()


def test_interrupt_returns_the_latest_denoised_prediction_of_each_image() -> None:
    model = FakeDenoiser(delay_s=0.003)

    def make():  # type: ignore[no-untyped-def]
        return request("euler_ancestral", 500, seeds=[7, 8], cfg=2.0)

    async def go() -> tuple:
        engine = make_engine(model)
        engine.start()
        job = engine.submit(make())
        other = engine.submit(request("euler", 20, seeds=[1]))  # finishes normally
        while job.progress.evals < 5:
            await asyncio.sleep(0.001)
        job.keep_partial = True
        engine.cancel(job)
        await asyncio.gather(job.wait_done(), other.wait_done())
        await engine.stop()
        return job, other

    job, other = run(go)
    assert job.status == JobStatus.cancelled and job.error is None
    assert other.status == JobStatus.succeeded
    evals = sum(1 for labels in model.labels if len(labels) in (4, 5))  # calls that carried the job's rows
    assert 5 <= evals < 500
    result = job.result
    assert result is not None and result.shape == (2, 1, 4, 4)
    torch.testing.assert_close(result, _partial_after(make, evals), atol=0, rtol=0)
    # a denoised prediction, not the noisy latent (sigma_max 20 noise would be far outside [-1, 1])
    assert result.abs().max() < 2


def test_interrupt_before_the_first_step_and_plain_cancel() -> None:
    model = FakeDenoiser(delay_s=0.003)

    async def go() -> tuple:
        engine = make_engine(model, max_batch_rows=1)
        engine.start()
        running = engine.submit(request("euler", 400, seeds=[1]))
        queued = engine.submit(request("euler", 10, seeds=[2]))  # waits: one row per call
        plain = engine.submit(request("euler", 10, seeds=[3]))
        while running.progress.evals < 2:
            await asyncio.sleep(0.001)
        queued.keep_partial = True
        engine.cancel(queued)  # never started: nothing to return
        engine.cancel(running)  # no keep_partial: a plain cancel keeps no images
        await asyncio.gather(running.wait_done(), queued.wait_done(), plain.wait_done())
        await engine.stop()
        return running, queued, plain

    running, queued, plain = run(go)
    assert running.status == queued.status == JobStatus.cancelled
    assert running.result is None and queued.result is None
    assert plain.status == JobStatus.succeeded


def test_drive_and_partial_agree_once_done() -> None:
    """A finished driver's partial() is its result."""
    model = FakeDenoiser()
    driver = start_job(request("heun", 4, seeds=[1, 2]), handle(model))
    out = drive(driver, model)
    torch.testing.assert_close(driver.partial(), out, atol=0, rtol=0)

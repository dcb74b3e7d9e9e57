"""The executor: runs one planned engine iteration in the engine's worker thread.

For each model call the scheduler planned it concatenates the rows, calls the model (through the
:class:`ModelRunner`), hands each driver its rows and advances it. A call that raises is retried
job by job, so only the culprit fails; a non-finite prediction fails its job. Finished jobs are
decoded here too (a VAE is model work).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from service.sampling.driver import Driver
from service.sampling.guidance import cat_cond
from service.sampling.spec import sampling_dtype
from service.sampling.stepper import NonFiniteError

from .jobs import Job, JobError, JobRequest
from .metrics import Metrics
from .runner import ModelHandle, ModelRunner
from .scheduler import Item, Scheduler


@dataclass
class Outcome:
    """One job's iteration: its driver (new jobs), its latest prediction of the first image (a copy),
    and, when it ended, its images or its error."""

    job: Job
    driver: Driver | None = None
    preview: Tensor | None = None
    images: Tensor | None = None
    error: JobError | None = None


def start_job(req: JobRequest, handle: ModelHandle) -> Driver:
    """The request's driver on the model's device (the one its validation built, when it did)."""
    if req.driver is not None:
        return req.driver
    return Driver.start(
        req.spec,
        handle.denoiser,
        (req.n, *(req.latent_shape or handle.latent_shape)),
        cond=req.cond,
        uncond=req.uncond,
        cfg_scale=req.cfg_scale,
        init=req.init,
        mask=req.mask,
        device=handle.device,
        dtype=sampling_dtype(handle.dtype),  # the model casts to its own dtype; the sampler state stays exact
    )


class Executor:
    def __init__(
        self, handle: ModelHandle, runner: ModelRunner, scheduler: Scheduler, metrics: Metrics | None
    ) -> None:
        self.handle, self.runner, self.scheduler, self.metrics = handle, runner, scheduler, metrics

    def step(self, batch: dict[Job, Driver | None]) -> list[Outcome]:
        """One iteration over the running jobs (``None``: a new job, whose driver starts here)."""
        outcomes = {job: Outcome(job) for job in batch}
        drivers: dict[Job, Driver] = {}
        for job, driver in batch.items():
            if driver is None:
                try:
                    driver = outcomes[job].driver = start_job(job.request, self.handle)
                except Exception as exc:
                    msg = f"could not start sampling: {type(exc).__name__}: {exc}"
                    outcomes[job].error = JobError("invalid_input", msg)
                    continue
            drivers[job] = driver
        items = [(job, d, track) for job, d in drivers.items() for track in d.pending()]
        for call in self.scheduler.plan(items):
            self._call([i for i in call if outcomes[i[0]].error is None], outcomes)
        for job, driver in drivers.items():
            out = outcomes[job]
            if out.error is None and driver.done:
                try:
                    out.images = self.runner.decode(driver.result())
                except Exception as exc:
                    out.error = JobError("model_error", f"decoding failed: {exc}")
        return list(outcomes.values())

    def _call(self, items: list[Item], outcomes: dict[Job, Outcome]) -> None:
        if not items:
            return
        inputs = [driver.inputs(track) for _, driver, track in items]
        x = torch.cat([i[0] for i in inputs])
        sigma = torch.cat([i[1] for i in inputs])
        cond = cat_cond([i[2] for i in inputs])
        t0 = time.perf_counter()
        try:
            out = self.runner.denoise(x, sigma, cond)
            if out.shape != x.shape:
                raise RuntimeError(
                    f"the denoiser returned shape {tuple(out.shape)} for input {tuple(x.shape)}"
                )
        except Exception as exc:
            jobs = list(dict.fromkeys(item[0] for item in items))
            if len(jobs) > 1:  # retry job by job so only the culprit fails
                for job in jobs:
                    self._call([item for item in items if item[0] is job], outcomes)
            else:
                msg = f"the model call failed: {type(exc).__name__}: {exc}"
                outcomes[jobs[0]].error = JobError("model_error", msg)
            return
        if self.metrics is not None:
            self.metrics.observe_call(self.handle.name, x.shape[0], time.perf_counter() - t0)
        offset = 0
        for job, driver, track in items:
            rows = driver.rows(track)
            part = out[offset : offset + rows]
            offset += rows
            result = outcomes[job]
            if result.error is not None:
                continue
            try:
                denoised = driver.feed(track, part)
                result.preview = denoised[:1].clone()  # a copy: a view would pin the whole batched output
            except NonFiniteError as exc:
                result.error = JobError("non_finite", str(exc))
            except Exception as exc:
                result.error = JobError("internal", f"the sampler failed: {type(exc).__name__}: {exc}")

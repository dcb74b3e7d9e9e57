"""The executor: runs one :class:`Plan` (an engine iteration) in the engine's worker thread.

For each model call of the plan it concatenates the rows, calls the model (through the
:class:`ModelRunner`), hands each driver its rows and advances it. A call that raises is retried
job by job, so only the culprit fails, and the plan it belonged to is logged; a non-finite
prediction fails its job. Finished jobs are decoded here too (a VAE is model work).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from service.sampling.driver import Driver, batch_inputs, finite_bound
from service.sampling.spec import sampling_dtype
from service.sampling.stepper import NonFiniteError

from .codes import ErrorCode
from .jobs import Job, JobError, JobRequest
from .metrics import Metrics
from .plan import Plan, Slot
from .runner import ModelHandle, ModelRunner

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """A job's news from the worker: its driver (new jobs), or, when it ended, its images or its error."""

    job: Job
    driver: Driver | None = None
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
    def __init__(self, handle: ModelHandle, runner: ModelRunner, metrics: Metrics | None) -> None:
        self.handle, self.runner, self.metrics = handle, runner, metrics

    def start(self, jobs: list[Job]) -> list[Outcome]:
        """Build the drivers of newly admitted jobs whose validation did not (set-up is device work)."""
        outcomes = []
        for job in jobs:
            out = Outcome(job)
            try:
                out.driver = start_job(job.request, self.handle)
            except Exception as exc:
                out.error = JobError(
                    ErrorCode.invalid_input, f"could not start sampling: {type(exc).__name__}: {exc}"
                )
            outcomes.append(out)
        return outcomes

    def partial(self, drivers: dict[Job, Driver]) -> list[Outcome]:
        """Interrupted jobs: their images as they stand (``Driver.partial``), decoded."""
        outcomes = []
        for job, driver in drivers.items():
            out = Outcome(job)
            try:
                out.images = self.runner.decode(driver.partial())
            except Exception as exc:
                out.error = JobError(ErrorCode.model_error, f"decoding failed: {exc}")
            outcomes.append(out)
        return outcomes

    @torch.inference_mode()
    def step(self, plan: Plan) -> list[Outcome]:
        """Run ``plan``'s model calls in order, feed each track its rows, decode finished drivers.
        Returns an outcome for each job that ended (images or error) only: the others advanced,
        which the engine reads off their drivers (no object per job per iteration).

        In inference mode, like the model call and the decode: the samplers' per-row tensor ops skip
        autograd's bookkeeping (about 11% of the steppers' CPU time). What leaves the worker already
        left it as inference tensors (the decoded images), and whoever reads a driver's latents later
        (previews, ComfyUI's LATENT) reads them without changing them in place."""
        if log.isEnabledFor(logging.DEBUG):  # here, not on the loop: describing reads sigmas off the device
            log.debug("%s: plan %s", self.handle.name, plan)
        failed: dict[Job, Outcome] = {}
        for index, call in enumerate(plan.calls):
            slots = [s for s in call.slots if s.job not in failed] if failed else list(call.slots)
            self._call(plan, index, slots, failed)
        outcomes = failed
        for job, driver in plan.drivers.items():
            if job not in failed and driver.done:
                out = outcomes[job] = Outcome(job)
                try:
                    out.images = self.runner.decode(driver.result())
                except Exception as exc:
                    out.error = JobError(ErrorCode.model_error, f"decoding failed: {exc}")
        return list(outcomes.values())

    def _call(self, plan: Plan, index: int, slots: list[Slot], failed: dict[Job, Outcome]) -> None:
        if not slots:
            return
        x, sigma, cond = batch_inputs([(slot.driver, slot.track) for slot in slots])
        t0 = time.perf_counter()
        try:
            out = self.runner.denoise(x, sigma, cond)
            if out.shape != x.shape:
                raise RuntimeError(
                    f"the denoiser returned shape {tuple(out.shape)} for input {tuple(x.shape)}"
                )
        except Exception as exc:
            jobs = list(dict.fromkeys(slot.job for slot in slots))
            if len(jobs) > 1:  # retry job by job so only the culprit fails
                log.warning(
                    "%s: model call %d of iteration %d failed (%s: %s); retrying job by job. plan: %s",
                    self.handle.name,
                    index,
                    plan.iteration,
                    type(exc).__name__,
                    exc,
                    plan,
                )
                for job in jobs:
                    self._call(plan, index, [s for s in slots if s.job is job], failed)
            else:
                log.error(
                    "%s: model call %d of iteration %d failed for job %s (%s: %s). plan: %s",
                    self.handle.name,
                    index,
                    plan.iteration,
                    jobs[0].id,
                    type(exc).__name__,
                    exc,
                    plan,
                )
                # the job's owner sees where it failed, never the other jobs of the plan
                where = f"iteration {plan.iteration}, call {index}"
                msg = f"the model call failed: {type(exc).__name__}: {exc} ({where})"
                failed[jobs[0]] = Outcome(job=jobs[0], error=JobError(ErrorCode.model_error, msg))
            return
        if self.metrics is not None:
            self.metrics.observe_call(self.handle.name, x.shape[0], time.perf_counter() - t0)
        # one finiteness check for the whole call; when it fails each row is checked on its own, so
        # only the jobs whose rows are not finite fail
        bound = finite_bound(out)
        # each slot's rows as views of the output: one split (0.3 us a row) instead of a slice per slot
        for slot, part in zip(slots, out.split([slot.rows for slot in slots]), strict=True):
            if slot.job in failed:
                continue
            try:
                slot.driver.feed(slot.track, part, bound)
            except NonFiniteError as exc:
                failed[slot.job] = Outcome(job=slot.job, error=JobError(ErrorCode.non_finite, str(exc)))
            except Exception as exc:
                msg = f"the sampler failed: {type(exc).__name__}: {exc}"
                failed[slot.job] = Outcome(job=slot.job, error=JobError(ErrorCode.internal, msg))

"""The engine: one asyncio task per model that runs every active job's sampler together.

Each iteration the :class:`Scheduler` admits queued jobs and plans the pending model evaluations
of all running jobs (whatever their sampler, schedule, step count, seeds or guidance scale) into
model calls of at most ``max_batch_rows`` rows: a :class:`Plan` value, built on the event loop;
the :class:`Executor` runs that plan in the engine's worker thread and advances each job's driver;
the engine applies the outcome: progress, results, failures. Per-job sampling state (drivers,
previews) is the engine's own, touched by one iteration at a time. Cancellation and deadlines
are checked between iterations.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from service.sampling.driver import Driver

from .codes import ErrorCode, JobStatus
from .executor import Executor, Outcome
from .jobs import Draining, Job, JobError, JobRequest, QueueFull
from .metrics import Metrics
from .omp_teams import release_team
from .runner import ModelHandle, ModelRunner
from .scheduler import Mode, Scheduler

Finalizer = Callable[[Job, Tensor], Any]  # runs in a thread: images in [-1, 1] -> the job's result


@dataclass
class EngineConfig:
    max_batch_rows: int = 64
    max_queue: int = 256
    batch_wait_ms: float = 2.0
    mode: Mode = Mode.iteration
    # batch-invariant mode: every denoiser call has exactly this many rows (padded), so an image is
    # bit for bit the same alone or batched (runner.py); None: calls of any size up to max_batch_rows
    invariant_rows: int | None = None


def _default_finalize(job: Job, images: Tensor) -> Any:
    return images


class Engine:
    def __init__(
        self,
        handle: ModelHandle,
        config: EngineConfig | None = None,
        metrics: Metrics | None = None,
        finalize: Finalizer | None = None,
    ) -> None:
        self.handle = handle
        self.config = config or EngineConfig()
        self.metrics = metrics
        self.finalize = finalize or _default_finalize
        self.runner = ModelRunner(
            handle,
            self.config.max_batch_rows,
            self.config.invariant_rows,
            None if metrics is None else metrics.network_rows.labels(handle.name).observe,
        )
        self.scheduler = Scheduler(self.config.mode, self.config.max_batch_rows, handle.cache_hits)
        self.executor = Executor(handle, self.runner, metrics)
        self.iterations = 0  # plans made so far (a plan's number, in logs)
        self.queue: deque[Job] = deque()
        self.active: list[Job] = []
        self._drivers: dict[Job, Driver] = {}  # running jobs' sampling state
        # each running job's driver until the job ends (its sampling state may go earlier): its latest
        # prediction is the preview, read only when someone asks
        self._previews: dict[Job, Driver] = {}
        self.draining = False
        self._held: list[tuple[Job, Tensor]] = []
        self._interrupted: dict[Job, Driver] = {}  # cancelled running jobs that keep their partial images
        self._finalizing: set[asyncio.Task[None]] = set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{handle.name}")
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._job_s = 1.0  # running mean of job durations, for Retry-After

    # --- public, event-loop side ---
    @property
    def name(self) -> str:
        return self.handle.name

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"engine-{self.name}")

    def submit(self, request: JobRequest, job: Job | None = None) -> Job:
        """Queue ``request`` (as ``job`` when given: a job created while its model loaded)."""
        if self.draining or self._stopping:
            raise Draining()
        if len(self.queue) >= self.config.max_queue:
            raise QueueFull(self.retry_after_s())
        job = Job(request, self.name) if job is None else job.attach(request)
        self.queue.append(job)
        self._gauges()
        self._wake.set()
        return job

    def cancel(self, job: Job) -> None:
        if job.status.finished:
            return
        job.cancel_requested = True
        if job in self.queue:
            self.queue.remove(job)
            self._end(job, JobStatus.cancelled)
        self._wake.set()

    def queue_position(self, job: Job) -> int | None:
        try:
            return self.queue.index(job) + 1
        except ValueError:
            return None

    def preview(self, job: Job) -> Tensor | None:
        """The running job's latest denoised prediction of its first image (None before its first step)."""
        driver = self._previews.get(job)
        latest = None if driver is None else driver.latest
        return None if latest is None else latest[:1]

    def retry_after_s(self) -> int:
        per_slot = max(1, len(self.active))
        return max(1, math.ceil(self._job_s * (1 + len(self.queue) / per_slot) / 4))

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.active or self._held or self._finalizing or self._interrupted)

    async def drain(self, timeout_s: float) -> None:
        """Stop admitting, let queued and running jobs finish within ``timeout_s``, then stop."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await self.stop()

    async def stop(self) -> None:
        self._stopping = True
        for job in [*self.queue, *self.active, *(j for j, _ in self._held), *self._interrupted]:
            self._end(
                job,
                JobStatus.failed,
                JobError(ErrorCode.shutdown, "the service shut down before the job finished"),
            )
        self.queue.clear()
        self.active.clear()
        self._held.clear()
        self._interrupted.clear()
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=30)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._task.cancel()
            self._task = None
        for task in list(self._finalizing):
            task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # --- the loop ---
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        wait_s = self.config.batch_wait_ms / 1000
        while not self._stopping:
            self._reap()
            if self._interrupted:
                await self._partials()
            if not self.active and not self.queue:
                self._wake.clear()
                self._release_team()
                await self._wake.wait()
                continue
            if not self.active and wait_s > 0 and self.config.mode != Mode.serial:
                await asyncio.sleep(wait_s)  # let a burst arrive before the first call
                self._reap()
            self._admit()
            if not self.active:
                continue
            await self._start_drivers()
            if not self.active:
                continue
            plan = self.scheduler.plan({job: self._drivers[job] for job in self.active}, self.iterations)
            self.iterations += 1
            outcomes = await loop.run_in_executor(self._executor, self.executor.step, plan)
            self._apply(plan.drivers, {out.job: out for out in outcomes})

    async def _start_drivers(self) -> None:
        """Drivers for newly admitted jobs: the one their validation built, else built in the worker."""
        todo = []
        for job in self.active:
            if job not in self._drivers:
                if job.request.driver is not None:
                    self._drivers[job] = self._previews[job] = job.request.driver
                else:
                    todo.append(job)
        if not todo:
            return
        loop = asyncio.get_running_loop()
        for out in await loop.run_in_executor(self._executor, self.executor.start, todo):
            if out.job.status.finished:  # cancelled meanwhile
                continue
            if out.error is not None:
                self.active.remove(out.job)
                self._end(out.job, JobStatus.failed, out.error)
            elif out.driver is not None:
                self._drivers[out.job] = self._previews[out.job] = out.driver

    async def _partials(self) -> None:
        """Interrupted jobs' images as they stand (decoded in the worker), then finished as usual."""
        drivers, self._interrupted = self._interrupted, {}
        loop = asyncio.get_running_loop()
        for out in await loop.run_in_executor(self._executor, self.executor.partial, drivers):
            if out.error is not None:
                self._end(out.job, JobStatus.cancelled, out.error)
            elif out.images is not None:
                out.job.t_computed = time.monotonic()
                self._held.append((out.job, out.images))
        self._release_held()

    def _release_team(self) -> None:
        """Idle: give the worker thread's OpenMP team back, so it cannot throttle a busy engine's."""
        try:
            self._executor.submit(release_team)
        except RuntimeError:  # the worker pool already shut down (the engine is stopping)
            pass

    def _admit(self) -> None:
        new = self.scheduler.admit(self.queue, self.active, holding=bool(self._held))
        for job in new:
            job.status, job.t_started = JobStatus.running, time.monotonic()
            self.active.append(job)
            job.notify()
        if new:
            for job in self.queue:
                job.notify()  # queue positions moved
            self._gauges()

    def _reap(self) -> None:
        now = time.monotonic()
        for group in (self.queue, self.active):
            for job in list(group):
                if job.cancel_requested:
                    group.remove(job)
                    driver = self._drivers.pop(job, None)
                    if job.keep_partial and driver is not None:
                        self._interrupted[job] = driver
                    else:
                        self._end(job, JobStatus.cancelled)
                elif now > job.deadline:
                    group.remove(job)
                    msg = f"the job did not finish within its deadline of {job.request.timeout_s:g} s"
                    self._end(job, JobStatus.failed, JobError(ErrorCode.deadline_exceeded, msg))
        self._release_held()  # the rest of a request batch may just have left by cancel or deadline
        self._gauges()

    def _apply(self, drivers: Mapping[Job, Driver], outcomes: dict[Job, Outcome]) -> None:
        """An iteration's result: the jobs in ``outcomes`` ended (images or error), the others advanced."""
        for job, driver in drivers.items():
            if job.status.finished:
                continue
            out = outcomes.get(job)
            if out is None:
                job.progress.follow(driver)
                if job.snapshot_steps:
                    job.snapshot(job.progress.step, driver.latest)
                job.notify()
            elif out.error is not None:
                if job in self.active:
                    self.active.remove(job)
                self._end(job, JobStatus.failed, out.error)
            elif out.images is not None:
                job.t_computed = time.monotonic()
                job.progress.finished()
                self.active.remove(job)
                self._drivers.pop(job, None)  # sampled: the state can go now
                self._forget(job)
                self._held.append((job, out.images))
                job.notify()
        self._release_held()
        self._gauges()

    def _release_held(self) -> None:
        """Finalize finished jobs; request batching holds them until its whole batch has left."""
        if self.scheduler.holds_results and self.active:
            return
        for job, images in self._held:
            task = asyncio.get_running_loop().create_task(self._finish(job, images))
            self._finalizing.add(task)
            task.add_done_callback(self._finalizing.discard)
        self._held.clear()

    async def _finish(self, job: Job, images: Tensor) -> None:
        if job.cancel_requested and not job.keep_partial:
            self._end(job, JobStatus.cancelled)
            return
        try:
            result = await asyncio.to_thread(self.finalize, job, images)
        except Exception as exc:  # encoding failed: this job only
            self._end(
                job, JobStatus.failed, JobError(ErrorCode.internal, f"encoding the result failed: {exc}")
            )
            return
        # an interrupted job (keep_partial) ends cancelled, with its images as they stood
        self._end(job, JobStatus.cancelled if job.cancel_requested else JobStatus.succeeded, result=result)

    def _end(self, job: Job, status: JobStatus, error: JobError | None = None, result: Any = None) -> None:
        if job.status.finished:
            return
        self._drivers.pop(job, None)
        self._previews.pop(job, None)
        self._forget(job)
        job.finish(status, error, result)
        if status == JobStatus.succeeded and job.t_started is not None and job.t_finished is not None:
            self._job_s = 0.8 * self._job_s + 0.2 * (job.t_finished - job.t_started)
        if self.metrics is not None:
            self.metrics.observe_job(self.name, status.value, job.timings())

    def _forget(self, job: Job) -> None:
        """Drop what the model keeps for the job's rows between calls (its step cache)."""
        if self.handle.forget is not None:
            self.handle.forget([job.request.cond, job.request.uncond])

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels(self.name).set(len(self.queue))
            self.metrics.running.labels(self.name).set(len(self.active) + len(self._held))

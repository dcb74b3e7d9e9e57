"""The service: jobs on the model pool's engines. Submitting (a model still loading: the job waits
in the ``loading`` state), cancelling, previews, draining, and finalizing a finished job (PNG
encoding off the event loop). Front ends (HTTP routes, the compat translators, the Ray replicas)
call this; it knows nothing of HTTP."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from service.engine import Draining, ImageResult, Job, JobRequest, JobStatus, JobStore, Metrics, QueueFull
from service.engine.jobs import JobError
from service.engine.omp_teams import TeamReleasingExecutor, release_team
from service.images import encode_images
from service.models.store import LoadedModel, ModelStore
from service.sampling.errors import InputError
from service.sampling.request import Limits

from .errors import ErrorCode, ModelUnavailable, ServingError, StoreUnavailable
from .jobstore import SYNC, Journal, RedisJournal, Restored, StateDB, TerminalListener, placeholder
from .pool import ModelPool, PoolSettings
from .previews import Previews, render
from .request import GenerationRequest, build_job, check_spec
from .webhooks import Webhooks, WebhookSettings

LOAD_RETRY_S = 5  # Retry-After for a queue full of jobs waiting for their model's load

log = logging.getLogger("kdiff.service")


class ServiceSettings(PoolSettings, WebhookSettings, Protocol):
    """What the service reads from its settings (``service.api.settings.Settings`` has it)."""

    model_store: Path
    job_timeout_s: float
    result_ttl_s: float
    max_results: int
    max_result_bytes: int
    drain_timeout_s: float
    max_steps: int
    max_images: int
    state_dir: str  # empty: jobs live in memory only
    state_reset: bool
    replay_attempts: int
    redis_url: str  # empty: no store shared with other replicas
    redis_prefix: str
    redis_lease_s: float


def finalize(job: Job, images: Tensor) -> ImageResult:
    """Runs in a thread: PNG-encode a finished job's images with their parameters."""
    params = dict(job.request.parameters)
    seeds = list(params.pop("seeds", job.request.spec.seeds))
    return ImageResult(encode_images(images, params, seeds), seeds, {**params, "seeds": seeds})


class Service:
    """The model pool, the job store and metrics; readiness and draining."""

    def __init__(self, settings: ServiceSettings, store: ModelStore | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.jobs = JobStore(settings.result_ttl_s, settings.max_results, settings.max_result_bytes)
        # the durable store: shared by replicas (KDIFF_REDIS_URL), or this process's (KDIFF_STATE_DIR; a
        # corrupted file raises StateCorrupt here, at start-up)
        s = settings
        self.journal = (
            RedisJournal(s.redis_url, s.redis_prefix, s.redis_lease_s, s.state_dir)
            if s.redis_url
            else Journal(s.state_dir, s.state_reset)
        )
        self.jobs.on_drop = self.journal.dropped
        store = store or ModelStore(settings.model_store)
        self.pool = ModelPool(settings, store, self.metrics, finalize)
        self.webhooks = Webhooks(settings, self.journal.db, self.metrics)
        if self.webhooks.enabled:
            self.add_terminal_listener(self.webhooks.on_terminal)
        self._waiting: set[asyncio.Task[None]] = set()  # jobs waiting for their model's load
        self._loading: Counter[str] = Counter()  # of those, the ones POST /jobs took, by model
        self.ready = False
        self.draining = False
        self.previews = Previews()
        self._threads: int | None = None
        self._leases: asyncio.Task[None] | None = None  # with a shared store: heartbeat and takeover

    async def startup(self) -> None:
        s = self.settings
        # loads, traces, encodes off the engines' threads give their OpenMP teams back (omp_teams.py)
        loop = asyncio.get_running_loop()
        if not isinstance(getattr(loop, "_default_executor", None), TeamReleasingExecutor):  # once per loop
            loop.set_default_executor(TeamReleasingExecutor(thread_name_prefix="kdiff-worker"))
        release_team()  # this thread's, if start-up ran torch on it
        if s.torch_threads:
            self._threads = torch.get_num_threads()
            torch.set_num_threads(s.torch_threads)
        await self.pool.start()
        await self.webhooks.start()
        await self._restore()
        if self.journal.shared:
            self._leases = asyncio.get_running_loop().create_task(self._keep_leases())
        self.ready = True

    @property
    def state_db(self) -> StateDB | None:
        """The state file other modules may keep their tables in (None without KDIFF_STATE_DIR)."""
        return self.journal.db

    def add_terminal_listener(self, fn: TerminalListener) -> None:
        """``fn(event, conn)`` at every job's end (jobstore/journal.py says when and where)."""
        self.journal.listeners.append(fn)

    async def _restore(self) -> None:
        """Jobs of the state dir: finished ones readable again, unfinished ones queued again, in the
        order they were accepted (one at a time, waiting for room in a full queue)."""
        s = self.settings
        self._replay(await self.journal.restore(s.result_ttl_s, s.replay_attempts, s.job_timeout_s))

    def _replay(self, restored: Restored) -> None:
        for job in restored.finished:
            self.jobs.add(job)
        for job, request in restored.replay:
            self.jobs.add(job)
            self._rewatch(job, request)

        async def replay() -> None:
            for job, request in restored.replay:
                await self._after_load(job, functools.partial(self.build, request), wait_for_room=True)

        if restored.replay:
            self._track(asyncio.get_running_loop().create_task(replay()))

    async def _keep_leases(self) -> None:
        """With a store shared by replicas (redis_journal.py): renew the leases of this replica's jobs
        four times per lease (from the event loop, so a long model call does not stop it), stop the
        jobs another replica took over, and take over the jobs of replicas that died."""
        journal, s = self.journal, self.settings
        assert isinstance(journal, RedisJournal)
        while True:
            try:
                for job in await journal.heartbeat():  # taken over: the new holder's copy is the job
                    self.cancel(job)
                    self.jobs.discard(job)
                if not self.draining:
                    runs = {m for m in self.pool.manifests if not s.models or m in s.models}
                    self._replay(await journal.takeover(runs, s.replay_attempts, s.job_timeout_s))
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis unreachable for a while: the next beat tries again
                log.exception("job leases: renewing or taking over failed")
            await asyncio.sleep(journal.lease_s / 4)

    async def find_job(self, job_id: str) -> Job | None:
        """The job with this id: in this process, else (a store shared by replicas) as the store has it."""
        job = self.jobs.get(job_id)
        if job is None and isinstance(self.journal, RedisJournal):
            job = await self.journal.lookup(job_id, self.settings.job_timeout_s)
            if job is not None and job.status.finished:
                self.jobs.add(job)  # read once (a copy: its replica's store still owns it)
        return job

    def _rewatch(self, job: Job, request: GenerationRequest) -> None:
        """A replayed job's progress webhooks, as when it was accepted (its terminal one comes from
        the journal's listener; nothing if the allow-list now refuses it)."""
        try:
            callback = self.webhooks.target(request.callback_url, job.owner)
        except InputError as exc:
            log.warning("job %s: its webhook is not sent: %s", job.id, exc.message)
            return
        if callback is not None and request.callback_progress_s:
            self.webhooks.follow_progress(job, callback, request.callback_progress_s)

    # --- jobs ---
    def limits(self) -> Limits:
        return Limits(self.settings.max_steps, self.settings.max_images)

    def build(self, request: GenerationRequest, model: LoadedModel) -> JobRequest:
        """``request`` checked against ``model`` and built into the engine's job (InputError naming
        the field when it does not fit)."""
        # the pool's upscaler models, once it has them (service/models/upscalers)
        upscalers = getattr(self.pool, "upscalers", None)
        return build_job(request, model, self.limits(), self.settings.job_timeout_s, upscalers)

    async def generate(
        self, request: GenerationRequest, owner: str | None = None, wait_load: bool = True, kind: str = SYNC
    ) -> Job:
        """Check ``request`` against its model and queue it as a job belonging to ``owner`` (a key id).
        A model that is not loaded is loaded first: awaited (``wait_load``, so field errors stay
        InputErrors), or the job is returned at once and waits in the ``loading`` state. Its
        webhook (``callback_url``, or the key's default) is checked first and sent when the job
        ends. Raises InputError, ModelUnavailable, and the engine's QueueFull / Draining.

        With a state dir the job is recorded before this returns: ``kind`` JOB (POST /jobs) is run
        again after a restart; SYNC (answered in its response) is recorded while it runs."""
        request = self.journal.settled(request)
        callback = self.webhooks.target(request.callback_url, owner)
        job = await self._queue(request, owner, wait_load)
        try:
            await self.journal.accepted(job, request, kind)
        except (InputError, ServingError):
            self.cancel(job)
            raise
        except Exception as exc:  # the store failed (Redis down, disk full): not recorded, not accepted
            self.cancel(job)
            raise StoreUnavailable(exc) from exc
        except BaseException:  # cancelled while recording: not accepted either
            self.cancel(job)
            raise
        if callback is not None and request.callback_progress_s:  # its end: the journal's listener
            self.webhooks.follow_progress(job, callback, request.callback_progress_s)
        return job

    async def _queue(self, request: GenerationRequest, owner: str | None, wait_load: bool) -> Job:
        name = self.pool.resolve(request.model)
        if name is None:
            known = self.pool.known()
            wanted = request.model or self.pool.default_model
            why = self.pool.manifest_errors.get(str(wanted))  # a folder of the store, skipped: say why
            skipped = f" (the store skipped it: {why})" if why else ""
            msg = f"unknown model {wanted!r}{skipped}; valid models: {', '.join(known)}"
            raise InputError("model", msg, known)
        if name not in self.pool.models and not wait_load:
            # what needs no loaded model is checked now: those field errors are not failed jobs later
            check_spec(
                request, self.pool.manifests[name], self.limits(), self.settings.job_timeout_s, discrete=True
            )
            return self.submit_loading(name, lambda m: self.build(request, m), owner)
        async with self.pool.using(name) as model:
            if model.builds_off_loop(request):  # image decoding, VAE and text encoding: torch work
                job_request = await asyncio.to_thread(self.build, request, model)
            else:
                job_request = self.build(request, model)
            return self.submit(name, job_request, owner)

    def submit(
        self, model: str, request: JobRequest, owner: str | None = None, job: Job | None = None
    ) -> Job:
        """Queue a built request on its model's engine (QueueFull, Draining from the engine)."""
        self.pool.touch(model)
        job = self.pool.engines[model].submit(request, job)
        job.owner = owner
        self.jobs.add(job)
        return job

    def submit_loading(
        self, model: str, build: Callable[[LoadedModel], JobRequest], owner: str | None = None
    ) -> Job:
        """A job for a model not loaded yet: it waits (events say ``loading``) while the model loads,
        then is built and queued; a failed load fails it with the loader's message."""
        self._check_room(model)
        job = Job(placeholder(self.settings.job_timeout_s), model)
        job.loading, job.owner = True, owner
        self.jobs.add(job)
        task = asyncio.get_running_loop().create_task(self._after_load(job, build))
        self._loading[model] += 1
        task.add_done_callback(lambda _: self._loading.subtract((model,)))
        self._track(task)
        return job

    def _check_room(self, model: str) -> None:
        """QueueFull when the jobs waiting for ``model`` (its engine's queue and those waiting for
        its load) fill KDIFF_MAX_QUEUE: without this, jobs accepted during a load were unbounded,
        and all past the queue failed when the load ended."""
        engine = self.pool.engines.get(model)
        queued = len(engine.queue) if engine is not None else 0
        if queued + self._loading[model] >= self.settings.max_queue:
            raise QueueFull(engine.retry_after_s() if engine is not None else LOAD_RETRY_S)

    def _track(self, task: asyncio.Task[None]) -> None:
        self._waiting.add(task)
        task.add_done_callback(self._waiting.discard)

    async def _after_load(
        self, job: Job, build: Callable[[LoadedModel], JobRequest], wait_for_room: bool = False
    ) -> None:
        """Build and queue a waiting job once its model is loaded (``wait_for_room``: a full queue
        is waited out, for jobs accepted before a restart, rather than failing them)."""
        try:
            async with self.pool.using(job.model) as loaded:
                if job.status.finished:
                    return
                request = await asyncio.to_thread(build, loaded)
                while not job.status.finished:
                    try:
                        self.submit(job.model, request, job.owner, job)
                        break
                    except QueueFull:
                        if not wait_for_room:
                            raise
                        await asyncio.sleep(0.2)
        except Draining:  # shutting down: a durable job stays queued in the store for the next start
            job.finish(JobStatus.failed, JobError(ErrorCode.shutdown.value, "the service shut down"))
        except ModelUnavailable as exc:
            job.finish(JobStatus.failed, JobError(exc.code.value, exc.message))
        except InputError as exc:
            job.finish(
                JobStatus.failed, JobError(ErrorCode.invalid_input.value, f"{exc.field}: {exc.message}")
            )
        except Exception as exc:  # queue full, draining, anything else: this job only
            job.finish(JobStatus.failed, JobError(ErrorCode.internal.value, f"{type(exc).__name__}: {exc}"))

    def cancel(self, job: Job) -> None:
        if job.loading:
            job.cancel_requested = True
            job.finish(JobStatus.cancelled)
            return
        engine = self.pool.engines.get(job.model)
        if engine is not None:
            engine.cancel(job)

    def preview(self, job: Job) -> Tensor | None:
        """A running job's latest prediction of its first image (an image, or a latent), or None."""
        engine = self.pool.engines.get(job.model)
        return None if engine is None else engine.preview(job)

    async def preview_png(self, job: Job, max_side: int) -> str | None:
        """A base64 PNG of :meth:`preview` (latent models: decoded by their VAE, see previews.py)."""
        latest, model = self.preview(job), self.pool.models.get(job.model)
        if latest is None or model is None:
            return None
        key = (job.id, *job.progress.mark, max_side)
        return await self.previews.made(key, lambda: render(model, latest[0], max_side))

    def queue_position(self, job: Job) -> int | None:
        engine = self.pool.engines.get(job.model)
        return None if engine is None else engine.queue_position(job)

    async def drain(self, timeout_s: float) -> None:
        """Readiness off, refuse new work, let running jobs finish within the timeout, stop engines."""
        self.draining = True
        self.ready = False
        for task in self._waiting:
            task.cancel()
        self.pool.cancel_loads()
        for job in self.jobs.list():
            if job.loading and not job.status.finished:
                job.finish(
                    JobStatus.failed,
                    JobError(ErrorCode.shutdown.value, "the service shut down while the model loaded"),
                )
        await asyncio.gather(*(e.drain(timeout_s) for e in self.pool.engines.values()))

    async def shutdown(self) -> None:
        self.ready = False
        if not self.draining:
            await self.drain(self.settings.drain_timeout_s)
        if self._leases is not None:  # after the drain: the jobs still running kept their leases
            self._leases.cancel()
        await self.webhooks.stop()
        await self.journal.close()
        self.pool.upscalers.close()
        if self._threads is not None:
            torch.set_num_threads(self._threads)

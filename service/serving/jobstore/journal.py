"""What the Service tells the job store, and what start-up brings back.

:class:`Journal` records each accepted job (awaited before the job is acknowledged) and each job's
end, and tells terminal listeners (webhooks) of every end: with a state dir inside the transaction
that records it, without one on the event loop. With no state dir it writes nothing: today's
in-memory behaviour. Start-up (:meth:`Journal.restore`) turns the stored rows back into jobs: the
finished with their results, the unfinished re-queued with the same request (and so the same seeds).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sqlite3
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from service.engine import ImageResult, Job, JobError, JobRequest, JobStatus
from service.engine.codes import ErrorCode
from service.engine.jobs import Progress
from service.sampling.spec import SamplingSpec

from ..request import GenerationRequest
from .codec import decode_request, encode_request
from .db import StateDB
from .store import DurableJobs, StoredJob

if TYPE_CHECKING:
    from .redis_store import Claimed, Stored

log = logging.getLogger("kdiff.state")

JOB, SYNC = "job", "sync"  # kinds: /jobs (replayed after a restart) | requests answered in their response


@dataclass(frozen=True)
class TerminalEvent:
    """A job that ended: the Job (read only), the request as received, its kind (JOB or SYNC)."""

    job: Job
    request: GenerationRequest
    kind: str


TerminalListener = Callable[[TerminalEvent, sqlite3.Connection | None], None]


def placeholder(timeout_s: float) -> JobRequest:
    """The request of a job that is not built yet (its model loads, or it waits to be replayed)."""
    return JobRequest(SamplingSpec("euler", "karras", 1, [0]), 1, {}, timeout_s=timeout_s)


@dataclass
class Restored:
    """What start-up found: finished jobs (results readable again) and jobs to run again."""

    finished: list[Job]
    replay: list[tuple[Job, GenerationRequest]]


class Journal:
    def __init__(self, folder: str | Path | None, reset: bool = False) -> None:
        self.db = StateDB(Path(folder), reset) if folder else None
        self.store = DurableJobs(self.db) if self.db is not None else None
        self.listeners: list[TerminalListener] = []
        self._durable: weakref.WeakSet[Job] = weakref.WeakSet()  # kind-JOB jobs that have a row
        self._watchers: dict[str, asyncio.Task[None]] = {}  # job id -> the task recording its end

    @property
    def durable(self) -> bool:
        return self.store is not None

    @property
    def shared(self) -> bool:
        """Whether other replicas share the store (redis_journal.py: jobs move between them)."""
        return False

    def settled(self, request: GenerationRequest) -> GenerationRequest:
        """The request to record: a random seed drawn now, so that a replay makes the same images."""
        if self.store is None or request.seed is not None:
            return request
        return request.replace(seed=secrets.randbelow(2**32))

    async def accepted(self, job: Job, request: GenerationRequest, kind: str) -> None:
        """Record ``job`` (returns once it is committed) and follow it to its end."""
        if self.store is None and not self.listeners:
            return
        self.follow(job, request, kind)
        if self.store is not None:
            if kind == JOB:
                self._durable.add(job)
            await asyncio.wrap_future(self.store.accepted(job, kind, lambda: encode_request(request)))

    def follow(self, job: Job, request: GenerationRequest, kind: str) -> None:
        task = asyncio.get_running_loop().create_task(self._on_end(job, request, kind))
        self._watchers[job.id] = task
        task.add_done_callback(lambda _: self._watchers.pop(job.id, None))

    async def _on_end(self, job: Job, request: GenerationRequest, kind: str) -> None:
        await job.wait_done()
        await self.ended(TerminalEvent(job, request, kind))

    async def ended(self, event: TerminalEvent) -> None:
        job = event.job
        if self.store is None:
            for fn in list(self.listeners):
                try:
                    fn(event, None)
                except Exception:
                    log.exception("a job-end listener failed")
            return
        if event.kind == JOB and job.error is not None and job.error.code == ErrorCode.shutdown:
            return  # not an end: it stays queued in the store and runs again at the next start
        hooks = list(self.listeners)

        def then(conn: sqlite3.Connection) -> None:
            for fn in hooks:
                fn(event, conn)

        try:
            await asyncio.wrap_future(self.store.ended(job, event.kind, then if hooks else None))
        except Exception:
            log.exception("recording the end of job %s failed", job.id)

    def dropped(self, job: Job) -> None:
        """The in-memory store let ``job`` go (TTL, count, bytes, or a /sample result delivered)."""
        store = self.store
        if store is None or job not in self._durable:
            return
        self._durable.discard(job)
        ending = self._watchers.get(job.id)
        if ending is None:
            store.forget(job.id)
        else:  # its end is recorded (and told to listeners) first, then it goes
            ending.add_done_callback(lambda _: store.forget(job.id))

    # --- start-up ---
    async def restore(self, ttl_s: float, max_attempts: int, timeout_s: float) -> Restored:
        """The stored jobs as jobs again. Synchronous requests that were running when the process
        died end failed (their client's connection died with it); a job already replayed
        ``max_attempts`` times ends failed, naming why."""
        out = Restored([], [])
        if self.store is None:
            return out
        replay, finished = await asyncio.to_thread(self.store.load, ttl_s, max_attempts)
        for row in finished:
            out.finished.append(_finished_job(row, timeout_s))
        again: list[str] = []
        for row in replay:
            job = _job(row, timeout_s)
            try:
                request = decode_request(row.request)
            except (ValueError, TypeError, KeyError) as exc:
                await self._fail(
                    job, None, JOB, ErrorCode.internal, f"the stored request cannot be read: {exc}"
                )
                out.finished.append(job)
                continue
            if row.kind != JOB:
                why = "the service restarted while this request ran; its client's connection closed with it"
                await self._fail(job, request, row.kind, ErrorCode.shutdown, why)
            elif row.attempts >= max_attempts:
                why = (
                    f"the service stopped {row.attempts + 1} times while this job was queued or running "
                    f"(replayed {row.attempts} times, KDIFF_REPLAY_ATTEMPTS={max_attempts}); not run again"
                )
                await self._fail(job, request, JOB, ErrorCode.internal, why)
                out.finished.append(job)
            else:
                again.append(job.id)
                self._durable.add(job)
                self.follow(job, request, JOB)
                out.replay.append((job, request))
        if again:
            await asyncio.wrap_future(self.store.bump_attempts(again))
        if out.replay or replay:
            log.warning("job store: %d jobs re-queued, %d results restored", len(out.replay), len(finished))
        return out

    async def _fail(
        self, job: Job, request: GenerationRequest | None, kind: str, code: ErrorCode, why: str
    ) -> None:
        job.finish(JobStatus.failed, JobError(code, why))
        if request is None:
            assert self.store is not None
            await asyncio.wrap_future(self.store.ended(job, kind))
        else:
            await self.ended(TerminalEvent(job, request, kind))

    async def close(self, timeout_s: float = 10.0) -> None:
        """Record the ends still in flight, then commit and stop the writer."""
        if self._watchers:
            done = [t for t in self._watchers.values() if not t.done()]
            await asyncio.wait(done, timeout=timeout_s) if done else None
        if self.db is not None:
            await asyncio.to_thread(self.db.close)


def _job(row: StoredJob | Stored | Claimed, timeout_s: float) -> Job:
    job = Job(placeholder(timeout_s), row.model)
    job.id, job.owner, job.created = row.id, row.owner, row.created
    job.loading = True  # waits for its model (and its turn) like a job whose model loads
    return job


def _finished_job(row: StoredJob | Stored, timeout_s: float) -> Job:
    job = Job(placeholder(timeout_s), row.model)
    job.id, job.owner, job.created = row.id, row.owner, row.created
    result = None
    if row.result is not None and row.pngs is not None:
        result = ImageResult(row.pngs, row.result["seeds"], row.result["parameters"])
        steps = int(result.parameters.get("steps", 1))
        job.progress = Progress(step=steps, total=steps, evals=1, expected_evals=1)
    error = None if row.error_code is None else JobError(row.error_code, row.error_message or "")
    job.finish(JobStatus(row.status), error, result)
    if row.finished is not None:  # its age counts towards KDIFF_RESULT_TTL_S as if it never left
        job.t_finished = time.monotonic() - max(0.0, time.time() - row.finished)
    return job

"""The Journal on a Redis shared by replicas (``KDIFF_REDIS_URL``): jobs move to a live replica.

What changes from the single-process store (journal.py):

- an accepted ``/jobs`` job is written to Redis with a lease held by this replica before it is
  acknowledged; :meth:`RedisJournal.heartbeat` renews the leases of every job it holds (from the event
  loop: a model call in the worker thread, however slow, does not stop it), and reports jobs another
  replica holds now (this one was taken for dead: the service stops its copy);
- :meth:`RedisJournal.takeover` claims unfinished jobs whose lease lapsed (their replica died) and
  hands them back as jobs to run again, with the stored request (same seeds, same images);
- a job's end is a compare-and-set (redis_store.py): recorded once per id, and only by its holder,
  so a run that lost its lease cannot overwrite the result of the run that took over;
- synchronous requests (``/sample``, A1111, OpenAI) are not stored: their answer goes back on their
  connection (the Ray ingress sends one whose engine died to another engine);
- nothing is read back at start-up: a new replica takes over what is orphaned like any other, and
  finished jobs are read from Redis when asked for (:meth:`RedisJournal.lookup`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import weakref
from pathlib import Path

from service.engine import Job, JobError, JobStatus
from service.engine.codes import ErrorCode

from ..request import GenerationRequest
from .codec import decode_request, encode_request
from .db import StateDB
from .journal import JOB, Journal, Restored, TerminalEvent, _finished_job, _job
from .redis_store import UNFINISHED, RedisJobs, new_holder

log = logging.getLogger("kdiff.state")


class RedisJournal(Journal):
    """Jobs on Redis under ``prefix``; leases of ``lease_s``. ``folder`` (optional) keeps this replica's
    webhook outbox (the SQLite file of journal.py, without its jobs table)."""

    def __init__(self, url: str, prefix: str, lease_s: float, folder: str | Path | None = None) -> None:
        super().__init__(None)
        self.db = StateDB(Path(folder)) if folder else None
        self.redis = RedisJobs(url, prefix, lease_s)
        self.lease_s = lease_s
        self.holder = new_holder(Job.id_prefix)
        self.keep_s = 600.0  # how long a finished job stays in Redis (KDIFF_RESULT_TTL_S, set by the service)
        self._held: dict[str, Job] = {}  # unfinished jobs whose lease this replica holds
        self._moved: weakref.WeakSet[Job] = weakref.WeakSet()  # taken over elsewhere: their end is not ours

    @property
    def durable(self) -> bool:
        return True

    @property
    def shared(self) -> bool:
        return True

    def settled(self, request: GenerationRequest) -> GenerationRequest:
        return request if request.seed is not None else request.replace(seed=secrets.randbelow(2**32))

    async def accepted(self, job: Job, request: GenerationRequest, kind: str) -> None:
        if kind != JOB:  # answered on its connection: nothing to move (listeners still hear its end)
            if self.listeners:
                self.follow(job, request, kind)
            return
        text = await asyncio.to_thread(encode_request, request)  # images encode off the loop
        self._held[job.id] = job
        self._durable.add(job)
        self.follow(job, request, kind)
        await self.redis.accepted(job, kind, text, self.holder)

    async def ended(self, event: TerminalEvent) -> None:
        job = event.job
        if event.kind != JOB:
            await super().ended(event)  # no store: listeners only
            return
        try:
            if job in self._moved:
                return
            if job.error is not None and job.error.code == ErrorCode.shutdown:
                return  # not an end: its lease lapses and a live replica runs it
            recorded = await self.redis.ended(job, self.holder, self.keep_s)
        except Exception:
            log.exception("recording the end of job %s in Redis failed", job.id)
            return
        finally:
            self._held.pop(job.id, None)
        if recorded != 1:
            return
        for fn in list(self.listeners):
            try:
                fn(event, None)
            except Exception:
                log.exception("a job-end listener failed")

    def dropped(self, job: Job) -> None:
        if job not in self._durable:
            return
        self._durable.discard(job)
        ending = self._watchers.get(job.id)

        def forget(_: object = None) -> None:
            asyncio.get_running_loop().create_task(self.redis.forget(job.id))

        if ending is None:
            forget()
        else:
            ending.add_done_callback(forget)

    async def restore(self, ttl_s: float, max_attempts: int, timeout_s: float) -> Restored:
        """Nothing to read back (a live replica takes over what is orphaned); Redis must answer."""
        self.keep_s = ttl_s
        try:
            await self.redis.client.ping()
        except Exception as exc:
            raise RuntimeError(
                f"the Redis job store (KDIFF_REDIS_URL) does not answer: {type(exc).__name__}: {exc}"
            ) from exc
        return Restored([], [])

    # --- leases ---
    async def heartbeat(self) -> list[Job]:
        """Renew this replica's leases; the jobs another replica holds now come back."""
        held = list(self._held)  # ended ones too, until their end is recorded (ended() drops them)
        lost = await self.redis.renew(held, self.holder)
        jobs = [self._held.pop(i) for i in lost if i in self._held]
        for job in jobs:
            self._moved.add(job)
            self._durable.discard(job)  # its record is the new holder's: never forgotten from here
            log.warning("job %s was taken over by another replica (this one missed its lease)", job.id)
        return jobs

    async def takeover(self, can_run: set[str], max_attempts: int, timeout_s: float) -> Restored:
        """Claim the orphaned jobs of models in ``can_run``: jobs to run again, and jobs that ran out
        of attempts (ended failed here)."""
        out = Restored([], [])
        for job_id, model in await self.redis.orphans():
            if model in can_run:
                await self._take(job_id, max_attempts, timeout_s, out)
        return out

    async def _take(self, job_id: str, max_attempts: int, timeout_s: float, out: Restored) -> None:
        row = await self.redis.claim(job_id, self.holder)
        if row is None:
            return
        job = _job(row, timeout_s)
        self._held[job.id] = job
        self._durable.add(job)
        try:
            request = decode_request(row.request)
        except (ValueError, TypeError, KeyError) as exc:
            why = f"the stored request cannot be read: {exc}"
            job.finish(JobStatus.failed, JobError(ErrorCode.internal, why))
            await self.redis.ended(job, self.holder, self.keep_s)
            out.finished.append(job)
            return
        if row.attempts > max_attempts:
            why = (
                f"the replica running this job stopped {row.attempts} times (KDIFF_REPLAY_ATTEMPTS="
                f"{max_attempts}); not run again"
            )
            job.finish(JobStatus.failed, JobError(ErrorCode.internal, why))
            await self.ended(TerminalEvent(job, request, JOB))
            out.finished.append(job)
            return
        log.warning("job %s taken over from a replica that stopped (attempt %d)", job.id, row.attempts)
        self.follow(job, request, JOB)
        out.replay.append((job, request))

    async def lookup(self, job_id: str, timeout_s: float) -> Job | None:
        """A job this replica does not have in memory, as Redis has it: a finished one with its result;
        an unfinished one held elsewhere as a queued view (its holder, or whoever takes it over, runs
        it). Read only: not added to this replica's leases."""
        row = await self.redis.get(job_id)
        if row is None:
            return None
        return _job(row, timeout_s) if row.status in UNFINISHED else _finished_job(row, timeout_s)

    async def close(self, timeout_s: float = 10.0) -> None:
        await super().close(timeout_s)
        await self.redis.close()

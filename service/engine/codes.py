"""How a job ends and why it failed: the engine's one list of each (both are also API values).

``JobStatus`` is a job's state (the finished ones are its finish reasons); ``ErrorCode`` is the
``code`` of a failed job's error. Both are ``StrEnum``: a member is its string, so JSON bodies,
logs and tables keyed by the string keep working.
"""

from __future__ import annotations

import enum


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in _FINISHED  # a set: read for every job on every iteration


_FINISHED = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})


class ErrorCode(enum.StrEnum):
    """Why a job or a request failed: the service's one list. It lives here, at the lowest layer that
    fails jobs, so the engine's ``JobError`` and the layers above (serving, the HTTP front ends, Ray)
    share it; each front end maps a code to its own answer (an HTTP status, an error body)."""

    invalid_input = "invalid_input"  # the request cannot be sampled; the message names the field
    unknown_model = "unknown_model"  # the job's model is not in the store
    busy = "busy"  # the model has queued or running jobs (an unload is refused)
    insufficient_memory = "insufficient_memory"  # the model does not fit the memory budget
    load_failed = "load_failed"  # the model's loader raised
    queue_full = "queue_full"  # the model's queue is full; retry later
    draining = "draining"  # the service is shutting down and takes no new work
    cancelled = "cancelled"  # the caller cancelled the job
    deadline_exceeded = "deadline_exceeded"  # the job's timeout passed (queue time counts)
    shutdown = "shutdown"  # the service stopped before the job finished
    non_finite = "non_finite"  # the model returned NaN / inf for the job's rows
    model_error = "model_error"  # the model call (or the VAE decode) raised for the job's rows alone
    internal = "internal"  # a bug: the sampler or the result encoding raised
    engine_lost = "engine_lost"  # Ray: the engine replica running the job died
    store_unavailable = "store_unavailable"  # the job store (SQLite file, Redis) could not record the job

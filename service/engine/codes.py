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
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class ErrorCode(enum.StrEnum):
    """Why a job failed."""

    invalid_input = "invalid_input"  # the request cannot be sampled (found once the model is known)
    non_finite = "non_finite"  # the model returned NaN / inf for the job's rows
    model_error = "model_error"  # the model call (or the VAE decode) raised for the job's rows alone
    deadline_exceeded = "deadline_exceeded"  # the job's timeout passed (queue time counts)
    shutdown = "shutdown"  # the service stopped before the job finished
    internal = "internal"  # a bug: the sampler or the result encoding raised
    unknown_model = "unknown_model"  # the job's model is not in the store
    load_failed = "load_failed"  # the job's model failed to load
    insufficient_memory = "insufficient_memory"  # the job's model does not fit the memory budget

"""The one list of error codes a job or a request can fail with, and the errors that carry them.

Errors here carry a code, never an HTTP status: each front end maps codes to its own answer (the HTTP
API: ``service/api/errors.py``). The list is ``service.engine.codes.ErrorCode`` (the lowest layer that
fails jobs), re-exported here for the layers above.
"""

from __future__ import annotations

from service.engine.codes import ErrorCode

__all__ = [
    "ErrorCode",
    "ModelBusy",
    "ModelUnavailable",
    "ServingError",
    "StartupError",
    "StoreUnavailable",
]


class ServingError(Exception):
    """A request the serving layer cannot take now. ``transient``: it may succeed later unchanged
    (the front end says so: HTTP 503 with Retry-After)."""

    def __init__(self, code: ErrorCode, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.code, self.message, self.transient = code, message, transient


class ModelUnavailable(ServingError):
    """A model that cannot be served now: unknown, does not fit the budget, or its loader failed."""


class ModelBusy(ModelUnavailable):
    def __init__(self, name: str) -> None:
        super().__init__(ErrorCode.busy, f"model {name!r} has queued or running jobs; unload it when idle")


class StoreUnavailable(ServingError):
    """The job store could not record an accepted job (Redis unreachable, a disk error): the job is not
    accepted, and the same request may succeed once the store answers again."""

    def __init__(self, exc: BaseException) -> None:
        msg = f"the job store could not record the job ({type(exc).__name__}: {exc}); retry later"
        super().__init__(ErrorCode.store_unavailable, msg, transient=True)


class StartupError(RuntimeError):
    """What stops the service from starting, said in one line for the operator (``kdiff serve`` prints
    it without a traceback): a model store with nothing to serve, a model the settings name that is
    missing or fails to load, a broken default model."""

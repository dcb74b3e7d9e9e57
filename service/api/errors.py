"""The one table from the serving layer's error codes to HTTP statuses (our routes and the
compatibility routes render the same status, each in its own body shape)."""

from __future__ import annotations

from fastapi import HTTPException

from service.serving.errors import ErrorCode, ServingError

STATUS: dict[ErrorCode, int] = {
    ErrorCode.invalid_input: 422,
    ErrorCode.unknown_model: 404,
    ErrorCode.busy: 409,
    ErrorCode.insufficient_memory: 507,
    ErrorCode.load_failed: 500,
    ErrorCode.queue_full: 429,
    ErrorCode.draining: 503,
    ErrorCode.cancelled: 409,
    ErrorCode.deadline_exceeded: 504,
    ErrorCode.shutdown: 503,
    ErrorCode.non_finite: 500,
    ErrorCode.model_error: 500,
    ErrorCode.internal: 500,
    ErrorCode.engine_lost: 503,
    ErrorCode.store_unavailable: 503,
}
TRANSIENT = 503  # an error that may pass unchanged later (ServingError.transient)


def status_of(code: str) -> int:
    """The HTTP status of an error code (500 for a code this table does not know)."""
    try:
        return STATUS[ErrorCode(code)]
    except ValueError:
        return 500


def http_error(exc: ServingError) -> HTTPException:
    """A serving error as the HTTPException the routes raise (``{"code", "message"}`` detail)."""
    status = TRANSIENT if exc.transient else STATUS[exc.code]
    headers = {"Retry-After": "5"} if status == TRANSIENT else None
    return HTTPException(status, {"code": exc.code.value, "message": exc.message}, headers=headers)

"""FastAPI dependencies, all in one place: the service state, API-key auth, job lookup."""

from __future__ import annotations

import hmac
import re

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.engine import Job

from .state import ServiceState

_bearer = HTTPBearer(auto_error=False, description="API key, when the service has KDIFF_API_KEYS set")
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def get_state(request: Request) -> ServiceState:
    return request.app.state.service  # type: ignore[no-any-return]


def require_api_key(
    state: ServiceState = Depends(get_state),
    creds: HTTPAuthorizationCredentials | None = Depends(_bearer),
) -> None:
    keys = state.settings.api_keys
    if not keys:
        return
    given = "" if creds is None else creds.credentials
    if not any(hmac.compare_digest(given.encode(), k.get_secret_value().encode()) for k in keys):
        raise HTTPException(
            401,
            "a valid API key is required (Authorization: Bearer <key>)",
            headers={"WWW-Authenticate": "Bearer"},
        )


def get_job(job_id: str, state: ServiceState = Depends(get_state)) -> Job:
    job = state.jobs.get(job_id) if _JOB_ID.match(job_id) else None
    if job is None:
        raise HTTPException(
            404, f"no job {job_id!r} (finished jobs are kept for {state.settings.result_ttl_s:g} s)"
        )
    return job


def accepting(state: ServiceState = Depends(get_state)) -> ServiceState:
    """The state, if new work is accepted (503 while starting or draining)."""
    if state.draining or not state.ready:
        raise HTTPException(
            503, "the service is not accepting work (starting or shutting down)", headers={"Retry-After": "5"}
        )
    return state

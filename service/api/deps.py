"""FastAPI dependencies, all in one place: the service state, the caller (API key), job lookup.

All are ``async def``: FastAPI runs a plain ``def`` dependency in its thread pool, a hop to a worker
thread and back per dependency per request (three on POST /sample), for functions that only read
attributes. Keep them non-blocking."""

from __future__ import annotations

import re

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.engine import Job
from service.serving.service import Service

from .guard import Caller, authenticate
from .settings import settings_of

# Only documents the scheme in OpenAPI; GuardMiddleware checks the key before the body is read.
_bearer = HTTPBearer(auto_error=False, description="API key, when the service has KDIFF_API_KEYS set")
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


async def get_state(request: Request) -> Service:
    return request.app.state.service  # type: ignore[no-any-return]


async def require_api_key(
    request: Request,
    state: Service = Depends(get_state),
    creds: HTTPAuthorizationCredentials | None = Depends(_bearer),
) -> Caller:
    """The caller; 401 without a valid key (when keys are set)."""
    caller = request.scope.get("state", {}).get("caller")
    if caller is None:  # no GuardMiddleware in front (an app mounted elsewhere): check here
        caller = authenticate(settings_of(state), dict(request.scope["headers"]))
    if caller is None:
        raise HTTPException(
            401,
            "a valid API key is required (Authorization: Bearer <key>, or Basic user:pass)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return caller  # type: ignore[no-any-return]


async def get_job(
    job_id: str, state: Service = Depends(get_state), caller: Caller = Depends(require_api_key)
) -> Job:
    """The job, if it exists and the caller may see it: another key's job is a 404, like a missing one,
    so ids cannot be probed. (With KDIFF_REDIS_URL, a job of another replica is read from Redis.)"""
    job = await state.find_job(job_id) if _JOB_ID.match(job_id) else None
    if job is None or not caller.owns(job.owner):
        raise HTTPException(
            404, f"no job {job_id!r} (finished jobs are kept for {settings_of(state).result_ttl_s:g} s)"
        )
    return job


async def accepting(state: Service = Depends(get_state)) -> Service:
    """The state, if new work is accepted (503 while starting or draining)."""
    if state.draining or not state.ready:
        raise HTTPException(
            503, "the service is not accepting work (starting or shutting down)", headers={"Retry-After": "5"}
        )
    return state

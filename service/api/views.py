"""Glue between routes and the engine: submitting a request, rendering jobs as response bodies."""

from __future__ import annotations

import base64

from fastapi import HTTPException

from service.engine import Draining, ImageResult, Job, JobStatus, QueueFull
from service.serving.errors import ServingError
from service.serving.jobstore import SYNC
from service.serving.request import GenerationRequest
from service.serving.service import Service

from .errors import http_error, status_of
from .schemas import (
    JobErrorBody,
    JobProgress,
    JobView,
    SampleRequest,
    SampleResponse,
    Timings,
    WebhookView,
)


async def submit(
    state: Service,
    body: SampleRequest | GenerationRequest,
    owner: str | None = None,
    wait_load: bool = True,
    kind: str = SYNC,
) -> Job:
    """Queue ``body`` through the serving layer as a job belonging to ``owner`` (a key id); ``kind``
    JOB: re-run after a restart (KDIFF_STATE_DIR). Its errors as HTTP answers (a field: 422 naming
    it; a model that cannot be served; a full queue: 429; draining: 503)."""
    request = body.request() if isinstance(body, SampleRequest) else body
    try:
        return await state.generate(request, owner, wait_load, kind)
    except ServingError as exc:  # a model that cannot be served; the job store down (503, retry)
        raise http_error(exc) from exc
    except QueueFull as exc:
        raise HTTPException(429, str(exc), headers={"Retry-After": str(exc.retry_after_s)}) from exc
    except Draining as exc:
        raise HTTPException(503, str(exc), headers={"Retry-After": "5"}) from exc


def sample_response(job: Job) -> SampleResponse:
    result: ImageResult = job.result
    return SampleResponse(
        images=[base64.b64encode(p).decode() for p in result.pngs],
        seeds=result.seeds,
        parameters=result.parameters,
        timings=Timings(**job.timings()),
    )


def progress(job: Job) -> JobProgress:
    p = job.progress
    eta = None if job.status != JobStatus.running else job.eta_s()
    return JobProgress(step=p.step, total=p.total, fraction=round(p.fraction, 4), eta_s=eta)


def job_view(state: Service, job: Job, with_result: bool = True) -> JobView:
    return JobView(
        id=job.id,
        status=job.status.value,
        model=job.model,
        created_at=job.created,
        queue_position=state.queue_position(job) if job.status == JobStatus.queued else None,
        progress=progress(job),
        result=sample_response(job) if with_result and job.status == JobStatus.succeeded else None,
        error=None if job.error is None else JobErrorBody(code=job.error.code, message=job.error.message),
        webhooks=[WebhookView(**d) for d in state.webhooks.view(job.id)] or None,
    )


def raise_for_failure(job: Job) -> None:
    if job.status == JobStatus.succeeded:
        return
    if job.status == JobStatus.cancelled:
        raise HTTPException(409, {"code": "cancelled", "message": "the job was cancelled", "job_id": job.id})
    err = job.error
    code = "internal" if err is None else err.code
    message = "unknown failure" if err is None else err.message
    status = status_of(code)
    headers = {"Retry-After": "5"} if status == 503 else None  # shut down mid-run: try again soon
    raise HTTPException(status, {"code": code, "message": message, "job_id": job.id}, headers=headers)

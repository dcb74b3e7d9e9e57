"""Glue between routes and the engine: submitting a request, rendering jobs as response bodies."""

from __future__ import annotations

import asyncio
import base64

from fastapi import HTTPException

from service.engine import Draining, ImageResult, Job, JobStatus, QueueFull
from service.serving.errors import ModelUnavailable
from service.serving.service import Service

from .errors import http_error, status_of
from .schemas import JobErrorBody, JobProgress, JobView, SampleRequest, SampleResponse, Timings
from .settings import settings_of
from .validation import FieldError, build_job, precheck


async def submit(
    state: Service, body: SampleRequest, owner: str | None = None, wait_load: bool = True
) -> Job:
    """Validate ``body`` against its model and queue it as a job belonging to ``owner`` (a key id).
    A model that is not loaded is loaded first: awaited (``wait_load``, so field errors stay 422s), or
    the job is returned at once and waits in the ``loading`` state."""
    name = body.model or state.pool.default_model
    if name is None or name not in state.pool.models and name not in state.pool.refresh():
        known = state.pool.known()
        raise FieldError("model", f"unknown model {name!r}; valid models: {', '.join(known)}", known)
    if name not in state.pool.models and not wait_load:
        precheck(
            body, state.pool.manifests[name], settings_of(state)
        )  # field errors stay 422s while it loads
        return state.submit_loading(name, lambda m: build_job(body, m, settings_of(state)), owner)
    try:
        model = await state.pool.ensure_loaded(name)
    except ModelUnavailable as exc:
        raise http_error(exc) from exc
    with state.pool.pinned(name):
        if body.init_image is not None or body.mask is not None or model.conditioning == "text":
            # image decoding, VAE encoding and text encoding are torch work: off the event loop
            job_req = await asyncio.to_thread(build_job, body, model, settings_of(state))
        else:
            job_req = build_job(body, model, settings_of(state))
        try:
            return state.submit(name, job_req, owner)
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
    )


def raise_for_failure(job: Job) -> None:
    if job.status == JobStatus.succeeded:
        return
    if job.status == JobStatus.cancelled:
        raise HTTPException(409, {"code": "cancelled", "message": "the job was cancelled", "job_id": job.id})
    err = job.error
    code = "internal" if err is None else err.code
    message = "unknown failure" if err is None else err.message
    raise HTTPException(status_of(code), {"code": code, "message": message, "job_id": job.id})

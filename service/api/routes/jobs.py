"""Asynchronous jobs: POST /jobs, GET /jobs, GET/DELETE /jobs/{id}, GET /jobs/{id}/events (SSE)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, HTTPException, Query, Response
from fastapi.responses import StreamingResponse

from service.engine import Job, JobStatus
from service.serving.jobstore import JOB
from service.serving.service import Service

from ..deps import accepting, get_job, get_state, require_api_key
from ..guard import Caller
from ..schemas import JobCreated, JobView, SampleRequest
from ..sse import job_events
from ..views import job_view, submit

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.post("", status_code=202, response_model=JobCreated)
async def create_job(
    body: SampleRequest,
    response: Response,
    state: Service = Depends(accepting),
    caller: Caller = Depends(require_api_key),
) -> JobCreated:
    """Queue a request; follow it with GET /jobs/{id} or its SSE stream. The job belongs to the
    caller's key: other keys get 404 for it. A model that is not loaded yet is loaded first (the
    job's events say `loading`; a failed load fails the job with the loader's message)."""
    job = await submit(state, body, caller.key_id, wait_load=False, kind=JOB)
    url = f"/jobs/{job.id}"
    response.headers["Location"] = url
    return JobCreated(
        id=job.id, status=job.status.value, urls={"job": url, "events": f"{url}/events", "cancel": url}
    )


@router.get("", response_model=list[JobView])
async def list_jobs(
    status: JobStatus | None = Query(None, description="only jobs with this status"),
    limit: int = Query(100, ge=1, le=1000),
    state: Service = Depends(get_state),
    caller: Caller = Depends(require_api_key),
) -> list[JobView]:
    """The caller's recent jobs (every job for an admin key), newest first (results omitted: GET
    /jobs/{id} has them)."""
    jobs = [
        j
        for j in reversed(state.jobs.list())
        if (status is None or j.status == status) and caller.owns(j.owner)
    ]
    return [job_view(state, j, with_result=False) for j in jobs[:limit]]


@router.get("/{job_id}", response_model=JobView)
async def read_job(job: Job = Depends(get_job), state: Service = Depends(get_state)) -> JobView:
    """Status, progress, and the result (base64 PNGs) or error."""
    return job_view(state, job)


@router.delete("/{job_id}", response_model=JobView)
async def cancel_job(job: Job = Depends(get_job), state: Service = Depends(get_state)) -> JobView:
    """Cancel a job; its rows leave the batch at the next iteration. Finished jobs are left as they are."""
    state.cancel(job)
    if not job.status.finished:
        try:
            await asyncio.wait_for(job.wait_done(), timeout=5.0)
        except asyncio.TimeoutError:
            pass
    return job_view(state, job)


@router.get(
    "/{job_id}/images/{index}", response_class=Response, responses={200: {"content": {"image/png": {}}}}
)
async def job_image(index: int, job: Job = Depends(get_job)) -> Response:
    """One image of a succeeded job, as a PNG."""
    if job.status != JobStatus.succeeded:
        raise HTTPException(409, f"job is {job.status.value}, not succeeded")
    pngs = job.result.pngs
    if not 0 <= index < len(pngs):
        raise HTTPException(404, f"index must be in [0, {len(pngs) - 1}]")
    return Response(pngs[index], media_type="image/png")


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def events(
    job: Job = Depends(get_job),
    preview: bool = Query(False, description="add a small PNG of the current prediction to progress events"),
    state: Service = Depends(get_state),
) -> StreamingResponse:
    """Server-Sent Events: `loading` (its model loads first), `queued` (position),
    `progress` (step, total, fraction, eta_s[, preview]),
    then one of `done` (the result), `error` or `cancelled`."""
    stream = job_events(state, job, preview)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream, media_type="text/event-stream", headers=headers)

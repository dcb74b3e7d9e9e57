"""POST /sample: run one request and return its images (JSON, or the PNG with Accept: image/png)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Query, Request, Response

from service.engine import Job, JobStatus
from service.images import grid_png
from service.serving.service import Service

from ..deps import accepting, require_api_key
from ..guard import Caller
from ..schemas import SampleRequest, SampleResponse
from ..views import raise_for_failure, sample_response, submit

router = APIRouter(tags=["sampling"])


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so the next message is a disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


@router.post(
    "/sample",
    response_model=SampleResponse,
    responses={
        200: {"content": {"image/png": {}}, "description": "JSON, or the PNG (a grid when n > 1)"},
        422: {"description": "a field does not fit; the message names it and the allowed values"},
        429: {"description": "queue full; see Retry-After"},
        503: {"description": "starting or shutting down"},
        504: {"description": "the job missed its deadline"},
    },
)
async def sample(
    body: SampleRequest,
    request: Request,
    keep: bool = Query(False, description="keep the result for GET /jobs/{id} (X-Job-Id) after replying"),
    state: Service = Depends(accepting),
    caller: Caller = Depends(require_api_key),
) -> Response:
    """Generate images and wait for them. A client that disconnects cancels its job. The result is
    not kept once it is delivered, unless ``keep=true``."""
    job = await submit(state, body, caller.key_id)
    try:
        return await _wait_and_reply(job, request, state)
    finally:
        if not keep:
            state.jobs.discard(job)


async def _wait_and_reply(job: Job, request: Request, state: Service) -> Response:
    done = asyncio.ensure_future(job.wait_done())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
        client_gone = gone.done()
    finally:
        gone.cancel()
        if not done.done():
            done.cancel()
            state.cancel(job)
    if client_gone and job.status != JobStatus.succeeded:
        # client closed the request (queued or running: its job is cancelled); nobody reads this
        return Response(status_code=499)
    raise_for_failure(job)
    result = job.result
    # both answers name the job: with ?keep=true it stays at GET /jobs/{X-Job-Id}
    headers = {"X-Job-Id": job.id, "X-Seeds": ",".join(map(str, result.seeds))}
    if "image/png" in request.headers.get("accept", ""):
        png = await asyncio.to_thread(grid_png, result.pngs, result.parameters)
        return Response(png, media_type="image/png", headers=headers)
    return Response(sample_response(job).model_dump_json(), media_type="application/json", headers=headers)

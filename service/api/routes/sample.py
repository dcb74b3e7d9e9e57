"""POST /sample: run one request and return its images (JSON, or the PNG with Accept: image/png)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request, Response

from ..deps import accepting, require_api_key
from ..images import grid_png
from ..schemas import SampleRequest, SampleResponse
from ..state import ServiceState
from ..views import raise_for_failure, sample_response, submit

router = APIRouter(tags=["sampling"], dependencies=[Depends(require_api_key)])


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
async def sample(body: SampleRequest, request: Request, state: ServiceState = Depends(accepting)) -> Response:
    """Generate images and wait for them. A client that disconnects cancels its job."""
    job = await submit(state, body)
    done = asyncio.ensure_future(job.wait_done())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not done.done():
            done.cancel()
            state.cancel(job)
    if not job.status.finished:
        return Response(status_code=499)  # client closed the request; nobody reads this
    raise_for_failure(job)
    if "image/png" in request.headers.get("accept", ""):
        result = job.result
        png = await asyncio.to_thread(grid_png, result["pngs"], result["parameters"])
        headers = {"X-Job-Id": job.id, "X-Seeds": ",".join(map(str, result["seeds"]))}
        return Response(png, media_type="image/png", headers=headers)
    return Response(sample_response(job).model_dump_json(), media_type="application/json")

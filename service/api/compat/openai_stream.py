"""OpenAI's streamed image responses (``stream: true``, text/event-stream), as the openai client's
ImageGenStreamEvent / ImageEditStreamEvent parse them: ``partial_images`` (0-3)
``<kind>.partial_image`` events, then one ``<kind>.completed`` event per image (kind:
image_generation, image_edit). Images in events are always b64_json.

A partial image is the first image's denoised prediction at evenly spread steps (of 20 steps and 3
partial images: after steps 5, 10 and 15), decoded at full size (a latent model's whole latent through
its VAE) and encoded like the final images. The engine keeps the prediction at those steps
(Job.snapshot_steps), so a fast model loses none; a job of fewer steps than asked sends fewer (as
OpenAI may).

The response starts with the first event: a refusal or a failure before it is a JSON error with its
status, as without ``stream``; one after it is an ``error`` event in OpenAI's error shape (the openai
client raises it as APIError). A client that goes away cancels the job.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from PIL import Image
from starlette.exceptions import HTTPException
from starlette.responses import StreamingResponse
from torch import Tensor

from service.engine import Job, JobStatus
from service.images import to_pil
from service.serving.previews import decode_full
from service.serving.service import Service

from ..sse import frame
from ..views import raise_for_failure
from . import openai_output as output
from .caller import CompatCall
from .errors import OpenAIError, openai_error
from .openai_schemas import ImageGenerationRequest
from .openai_translate import Translated
from .runner import disconnected, submit_all

log = logging.getLogger(__name__)
KEEPALIVE_S = 15.0
# the completed events' usage, as the client's ImageGenCompletedEvent.Usage has it
EVENT_USAGE = {k: v for k, v in output.NO_USAGE.items() if k != "output_tokens_details"}
Finals = Callable[[list[Job]], list[bytes]]  # the finished jobs' images, encoded for the response


def spread(total: int, partials: int) -> frozenset[int]:
    """``partials`` steps evenly spread inside 1..total-1 (fewer where there are not as many)."""
    steps = {round(total * (i + 1) / (partials + 1)) for i in range(partials)}
    return frozenset(s for s in steps if 0 < s < total)


async def stream(
    call: CompatCall, req: ImageGenerationRequest, t: Translated, kind: str, finals: Finals
) -> StreamingResponse:
    """Queue ``t`` and answer its events; waits for the first event (see the module's docstring)."""
    (job,) = await submit_all(call, [t.body])
    job.snapshot_steps = spread(job.progress.total, req.partial_images or 0)
    events = _events(call.state, req, t, kind, job, finals)
    nxt = asyncio.ensure_future(events.__anext__())
    gone = asyncio.ensure_future(disconnected(call.request))
    try:
        await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not nxt.done():  # the client went away first: cancelled inside, the job is cancelled
            nxt.cancel()
            await asyncio.gather(nxt, return_exceptions=True)
    if nxt.cancelled():
        raise OpenAIError(409, "the request was cancelled (the client went away)", None, "cancelled")
    first = nxt.result()  # raises what the generator raised: a JSON error
    return StreamingResponse(_chain(first, events), media_type="text/event-stream")


async def _chain(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    yield first
    async for item in rest:
        yield item


def _fields(req: ImageGenerationRequest, t: Translated, kind: str, event: str) -> dict[str, Any]:
    return {
        "type": f"{kind}.{event}",
        "created_at": int(time.time()),
        "size": f"{t.size[0]}x{t.size[1]}",
        "quality": output.quality(req),
        "background": "opaque",
        "output_format": output.output_format(req),
    }


def _partial(
    state: Service, job: Job, latest: Tensor, t: Translated, req: ImageGenerationRequest
) -> bytes | None:
    model = state.pool.models.get(job.model)
    if model is None:  # unloaded meanwhile: no partial image
        return None
    img = to_pil(decode_full(model, latest[0]))
    if img.size != t.size:  # as the final images (generated at another size, resized)
        img = img.resize(t.size, Image.Resampling.LANCZOS)
    return output.encode(img, req)


def _error_event(job: Job) -> str:
    try:
        raise_for_failure(job)
        body: dict[str, Any] = {"message": "unknown failure", "code": None}
        status = 500
    except HTTPException as exc:
        detail = exc.detail if isinstance(exc.detail, dict) else {"message": str(exc.detail)}
        body, status = detail, exc.status_code
    resp = openai_error(status, str(body.get("message")), None, body.get("code"))
    return frame("error", json.loads(bytes(resp.body)))


async def _events(
    state: Service, req: ImageGenerationRequest, t: Translated, kind: str, job: Job, finals: Finals
) -> AsyncIterator[str]:
    sent = 0  # partial images sent
    started = False  # whether an event went out (then failures are events, not JSON errors)
    try:
        while True:
            changed = job.change_event()
            while job.snapshots and job.status not in (JobStatus.failed, JobStatus.cancelled):
                _, latest = job.snapshots.pop(0)
                try:
                    png = await asyncio.to_thread(_partial, state, job, latest, t, req)
                except Exception:  # a preview that fails (the VAE out of memory) fails no request
                    log.warning("partial image of job %s not sent", job.id, exc_info=True)
                    png = None
                if png is not None:
                    data = _fields(req, t, kind, "partial_image")
                    data |= {"b64_json": base64.b64encode(png).decode(), "partial_image_index": sent}
                    yield frame(f"{kind}.partial_image", data)
                    sent, started = sent + 1, True
            if job.status.finished:
                break
            try:
                await asyncio.wait_for(changed.wait(), KEEPALIVE_S)
            except asyncio.TimeoutError:
                if started:  # an SSE comment: proxies keep a quiet stream open
                    yield ": keep-alive\n\n"
        if job.status != JobStatus.succeeded:
            if not started:
                raise_for_failure(job)  # a JSON error with its status
            yield _error_event(job)
            return
        for image in await asyncio.to_thread(finals, [job]):
            data = _fields(req, t, kind, "completed")
            data |= {"b64_json": base64.b64encode(image).decode(), "usage": EVENT_USAGE}
            if req.safety_identifier or req.user:
                data["safety_identifier"] = req.safety_identifier or req.user
            yield frame(f"{kind}.completed", data)
    finally:
        if not job.status.finished:
            state.cancel(job)
        job.snapshots.clear()

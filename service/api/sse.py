"""The Server-Sent Events stream of one job."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from service.engine import Job, JobStatus
from service.serving.service import Service

from .views import job_view, progress

KEEPALIVE_S = 15.0
PREVIEW_SIDE = 64  # pixels on the long side of a progress event's preview


def frame(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def job_events(state: Service, job: Job, preview: bool) -> AsyncIterator[str]:
    last: tuple[Any, ...] | None = None
    while True:
        changed = job.change_event()  # taken before reading, so no update is missed
        status = job.status
        if status.finished:
            view = job_view(state, job)
            if status == JobStatus.succeeded:
                assert view.result is not None
                yield frame("done", {"id": job.id, **view.result.model_dump()})
            elif status == JobStatus.cancelled:
                yield frame("cancelled", {"id": job.id})
            else:
                err = view.error.model_dump() if view.error else {}
                yield frame("error", {"id": job.id, **err})
            return
        if job.loading:
            key: tuple[Any, ...] = ("loading",)
            if key != last:
                yield frame("loading", {"id": job.id, "model": job.model})
        elif status == JobStatus.queued:
            key = ("queued", state.queue_position(job))
            if key != last:
                yield frame("queued", {"id": job.id, "position": key[1]})
        else:
            p = progress(job)
            key = ("progress", *job.progress.mark)
            if key != last:  # one event per completed step (and per percent of an adaptive sampler's)
                data = {"id": job.id, **p.model_dump()}
                image = await state.preview_png(job, PREVIEW_SIDE) if preview else None
                if image is not None:
                    data["preview"] = image
                yield frame("progress", data)
        last = key
        try:
            await asyncio.wait_for(changed.wait(), KEEPALIVE_S)
        except asyncio.TimeoutError:
            yield ": keep-alive\n\n"

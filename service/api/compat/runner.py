"""Submit translated requests to the engine (the same path as POST /sample) and wait for them;
a client that goes away cancels its jobs."""

from __future__ import annotations

import asyncio

from fastapi import Request

from service.engine import Job
from service.serving.request import GenerationRequest

from ..guard import owner_of
from ..views import raise_for_failure, submit
from .caller import CompatCall


async def disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


async def submit_all(call: CompatCall, bodies: list[GenerationRequest]) -> list[Job]:
    """The jobs of one frontend request, queued together (so the engine batches them); one refused
    cancels those queued before it."""
    jobs: list[Job] = []
    try:
        for body in bodies:
            jobs.append(await submit(call.state, body, owner_of(call.request)))
    except BaseException:
        for job in jobs:
            call.state.cancel(job)
        raise
    call.compat.track(call.caller, jobs)
    return jobs


async def run(call: CompatCall, bodies: list[GenerationRequest], wait_disconnect: bool = True) -> list[Job]:
    """All jobs of one frontend request, submitted together (so the engine batches them), finished.

    A failed job raises its HTTP error (after cancelling the rest); cancelled jobs (the caller's
    /interrupt) come back as they are.
    """
    state, request = call.state, call.request
    jobs = await submit_all(call, bodies)
    done = asyncio.ensure_future(asyncio.gather(*(j.wait_done() for j in jobs)))
    waits: set[asyncio.Future] = {done}
    gone = asyncio.ensure_future(disconnected(request)) if wait_disconnect else None
    if gone is not None:
        waits.add(gone)
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if gone is not None:
            gone.cancel()
        if not done.done():
            # a cancelled gather ends with CancelledError set as its exception: read it, or asyncio
            # logs "exception was never retrieved" for every client that goes away mid-run
            done.add_done_callback(_retrieve)
            done.cancel()
            for job in jobs:
                state.cancel(job)
    for job in jobs:
        if job.status.value == "failed":
            raise_for_failure(job)
    return jobs

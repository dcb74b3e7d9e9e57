"""Run one HTTP request through an ASGI app in this process and hand back its response as messages.

An engine replica (ray_serve.EngineReplica) receives a request as plain data from an ingress replica,
runs it through the unmodified service app (GuardMiddleware, routes, schemas, SSE) and streams the
response back: first ``{"status", "headers", "body", "more"}`` (the start and the first body chunk
together, so a plain response is one message), then one ``bytes`` per further chunk. Cancelling the
iterator is a client disconnect for the app (a /sample job is cancelled, an SSE stream stops).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.types import ASGIApp, Message

log = logging.getLogger("kdiff.deploy")


def scope_of(req: dict[str, Any]) -> dict[str, Any]:
    """The ASGI scope of a request given as data (method, path, query, headers, client)."""
    path: str = req["path"]
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": req["method"],
        "scheme": req.get("scheme", "http"),
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": req.get("query", "").encode(),
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in req["headers"]],
        "client": tuple(req["client"]) if req.get("client") else None,
        "server": tuple(req["server"]) if req.get("server") else None,
        "state": {},
    }


async def run_asgi(
    app: ASGIApp,
    req: dict[str, Any],
    extra_headers: list[tuple[str, str]] = (),  # type: ignore[assignment]
) -> AsyncIterator[Any]:
    queue: asyncio.Queue[Message | None] = asyncio.Queue()
    gone = asyncio.Event()
    sent_body = False

    async def receive() -> Message:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": req.get("body", b""), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await queue.put(message)

    async def run() -> None:
        try:
            await app(scope_of(req), receive, send)
        except Exception:  # the app already sent its 500 when it could
            log.exception("request %s %s failed", req["method"], req["path"])
        finally:
            await queue.put(None)

    task = asyncio.get_running_loop().create_task(run())
    start: Message | None = None
    answered = False
    try:
        while True:
            message = await queue.get()
            if message is None:  # the app returned
                if start is not None:  # started a response, sent no body
                    yield _first(start, b"", False, extra_headers)
                elif not answered:  # failed before starting one
                    yield {"status": 500, "headers": [], "body": b"", "more": False}
                return
            if message["type"] == "http.response.start":
                start = message
                continue
            if message["type"] != "http.response.body":
                continue
            body, more = message.get("body", b""), message.get("more_body", False)
            if start is not None:
                yield _first(start, body, more, extra_headers)
                start, answered = None, True
            elif body:
                yield body
            if not more:
                return
    finally:
        gone.set()  # the app sees a disconnect: a waiting /sample cancels its job, SSE stops
        if not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), 5.0)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                task.cancel()


def _first(start: Message, body: bytes, more: bool, extra: list[tuple[str, str]]) -> dict[str, Any]:
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in start.get("headers", [])]
    return {"status": start["status"], "headers": headers + list(extra), "body": body, "more": more}

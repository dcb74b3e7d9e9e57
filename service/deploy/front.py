"""What an engine replica does with an HTTP request before its service app sees it.

Serve's proxy hands each request to the engine replica the request router picked (router.py). Most
requests are this replica's own: they go straight into the service app (GuardMiddleware, routes, SSE)
with nothing read or copied on the way; the response gets ``X-Kdiff-Engine``. The rest are relayed
through a handle call to the peer that should answer (``EngineReplica.relay``), the response streamed
back with ``X-Kdiff-Via`` naming this replica:

- ``GET /jobs``, ``/models``, ``/metrics``: every slot's answer, merged (routing.merge);
- ``/jobs/{id}...`` of a job another engine holds (its id names another slot or an older incarnation;
  with the Redis store, Redis's ``place`` of the job): that engine's answer. A job whose engine died:
  without Redis 410 ``engine_lost`` (or 503 while in flight), with Redis the answer of the engine that
  takes it over; an event stream relayed here goes on from there (router.py sends streams of the
  Redis store to a peer of the holder for this reason);
- new work for a model this slot's placement does not include: the least busy slot that has it.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.guard import body_limit, error_body, too_large

from .asgi import run_asgi
from .routing import (
    ENGINE_HEADER,
    FANOUT,
    JOB_PATH,
    MODEL_ACTION,
    Placement,
    Route,
    incarnation_of,
    job_prefix,
    merge,
    slot_of_job,
)
from .shared import Shared, SharedConfig

UNFINISHED = ("queued", "running")
VIA_HEADER = "x-kdiff-via"  # the engine replica that relayed a response from another
PASSED_HEADER = "x-kdiff-passed"  # engines a relayed request went past (died, or took it in no time)
HOP_BY_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive"}
DEAD = (RayActorError, ActorDiedError, ActorUnavailableError)


def _error(status: int, code: str, message: str, retry_after: float | None = None) -> Response:
    headers = {} if retry_after is None else {"Retry-After": str(max(1, math.ceil(retry_after)))}
    body = json.dumps({"detail": {"code": code, "message": message}})
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _query_int(query: str, name: str, default: int) -> int:
    from urllib.parse import parse_qs

    try:
        return int(parse_qs(query).get(name, [default])[0])
    except ValueError:
        return default


def _lost(slot: int, exc: BaseException) -> str:
    return (
        f"engine replica engine{slot} went away ({type(exc).__name__}); its jobs are lost, Serve restarts "
        "it (resubmit: the same seed gives the same image)"
    )


def _raw(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]


class _TryAnother(Exception):
    """An engine did not take the request (``dead``: it died); the next engine may."""

    def __init__(self, dead: bool) -> None:
        self.dead = dead


class _Call:
    """One relayed call's response messages: a peer's stream (a Serve handle's generator) or this
    replica's own app run on the request (run_asgi), behind one interface."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def __aiter__(self) -> _Call:
        return self

    async def __anext__(self) -> Any:
        return await self.stream.__anext__()

    async def assigned(self, timeout_s: float) -> bool:
        """Whether Serve hands the call to the peer within ``timeout_s`` (Serve holds a call to a
        slot with no running replica until one starts: a dead engine's restart). Uses the handle's
        private assignment future, the only place Serve exposes it."""
        assignment = getattr(self.stream, "_fetch_future_result_async", None)
        if assignment is None:  # this replica's own app, or another Ray version: no timeout
            return True
        task = asyncio.ensure_future(assignment())
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        if done:
            task.result()
            return True
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # cancelled with the call
        return False

    def cancel(self) -> None:
        """Cancel the call, best effort (on a call that already failed, cancel() re-raises its error)."""
        try:
            if hasattr(self.stream, "cancel"):
                self.stream.cancel()
            else:
                asyncio.ensure_future(self.stream.aclose())
        except Exception:
            pass


async def _lifespan(receive: Receive, send: Send) -> None:
    """Serve runs the ASGI lifespan of an ingress app; the service app's own lifespan is entered by the
    replica itself (its models load before the replica is ready), so this one only acknowledges."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class Front:
    """The ASGI app Serve's proxy calls on an engine replica (see the module's doc)."""

    def __init__(
        self,
        app: ASGIApp,
        slot: int,
        incarnation: str,
        header: tuple[str, str],
        placement: list[list[str]],
        limits: tuple[int, int],
        shared: SharedConfig | None,
        assign_s: float,
        peer: Callable[[dict[str, Any], int], Any],
    ) -> None:
        self.app, self.slot, self.incarnation, self.header = app, slot, incarnation, header
        self.prefix = job_prefix(slot, incarnation)
        self.placement = Placement(placement)
        self.restricted = any(placement)  # some slot serves only some models: new work may move
        self.limits = limits  # the service's (max_body_bytes, max_chunked_bytes)
        self.shared = None if shared is None else Shared(shared, len(placement))
        self.assign_s = assign_s
        self.peer = peer  # (request, slot) -> a Serve handle's response stream from that slot
        self.via = (VIA_HEADER, f"engine{slot}")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await _lifespan(receive, send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        job = JOB_PATH.match(path)
        body: bytes | None = None
        if method == "GET" and path.rstrip("/") in FANOUT and len(self.placement.models) > 1:
            route = Route("fanout", list(range(len(self.placement.models))))
        elif job is not None:
            if await self._holds(job.group(1)):
                await self.settled(job.group(1))
                return await self._local(scope, receive, send)
            route = Route("job", [slot_of_job(job.group(1))[0]], job.group(1))
        elif self.restricted and (method == "POST" or MODEL_ACTION.match(path)):
            body = await self._body(scope, receive)
            if body is None:
                return await self._too_large(scope, receive, send)
            route = self.placement.route(method, path, body)
            if self.slot in route.slots:
                return await self._local(scope, _replay(body, receive), send)
        else:
            return await self._local(scope, receive, send)
        if body is None:
            body = await self._body(scope, receive)
            if body is None:
                return await self._too_large(scope, receive, send)
        response = await self._relay(_request(scope, body), route)
        response.headers[VIA_HEADER] = self.via[1]
        await response(scope, receive, send)

    async def _local(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The request through this replica's own app, untouched; the response names this engine."""
        name, value = self.header[0].encode(), self.header[1].encode()

        async def named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (name, value)]}
            await send(message)

        await self.app(scope, receive, named)

    async def _holds(self, job_id: str) -> bool:
        """Whether this replica holds the job (answers for it from memory)."""
        if self.shared is not None:
            place, _ = await self.shared.place(job_id)
            if place is not None:
                return place == self.prefix
        return job_id[:8] == self.prefix

    async def settled(self, job_id: str) -> None:
        """With the Redis store, Redis names a job's new holder a moment before that holder has the job
        in memory (it takes the job over, then queues it); a request meanwhile would get Redis's
        snapshot of the job (an event stream of it would never move). Waits for it, at most a lease."""
        if self.shared is None:
            return
        jobs = self.app.state.service.jobs  # type: ignore[attr-defined]
        deadline = time.monotonic() + self.shared.config.lease_s
        while jobs.get(job_id) is None and time.monotonic() < deadline:
            place, _ = await self.shared.place(job_id)
            if place != self.prefix:
                return
            await asyncio.sleep(0.05)

    async def _body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The request body, or None as soon as it passes the service's limit."""
        length = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"content-length"), None)
        limit, refused = body_limit(length, *self.limits)
        if refused:
            return None
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        length = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"content-length"), None)
        limit, _ = body_limit(length, *self.limits)
        body = json.dumps(error_body(scope["path"], 413, too_large(limit)))
        headers = {"Connection": "close", self.header[0]: self.header[1]}
        response = Response(body, status_code=413, media_type="application/json", headers=headers)
        await response(scope, receive, send)

    # --- relaying to the engine that should answer ---

    async def _relay(self, req: dict[str, Any], route: Route) -> Response:
        if route.kind == "fanout":
            return await self._fanout(req, route.slots)
        if self.shared is not None:
            return await self._shared_call(route, req)
        slot = route.slots[0] if route.kind == "job" else self.placement.pick(route.slots)
        if slot >= len(self.placement.models):
            return _error(404, "unknown_job", f"no job {route.job_id!r} (no engine slot {slot})")
        return await self._call(slot, req, route.job_id)

    def _open(self, slot: int, req: dict[str, Any]) -> _Call:
        if slot == self.slot:
            return _Call(run_asgi(self.app, req, [self.header]))
        return _Call(self.peer(req, slot))

    async def _shared_call(self, route: Route, req: dict[str, Any]) -> Response:
        """With the Redis store: a job's requests go where Redis says it is (else to any engine, which
        reads it from Redis); new work to the least busy live engine with the model. An engine that
        died before answering: the same request to the next one (at-least-once: the same seeds give
        the same images; a job it had recorded is taken over too, so it may run twice)."""
        assert self.shared is not None
        live = await self.shared.live()
        follow, place, placed = False, None, None
        if route.kind == "job":
            job_id = route.job_id
            assert job_id is not None
            place, status = await self.shared.place(job_id)
            placed = Shared.slot_of(place)
            view = req["method"] == "GET" and req["path"].rstrip("/") == f"/jobs/{job_id}"
            follow = placed is not None and status in UNFINISHED and not view  # only its holder will do
            if follow and placed not in live:
                # its engine is gone and nobody took it over yet: cancel, stream or read it where it
                # goes (a plain GET answers at once from any engine: queued)
                return await self._moved(job_id, place, req)
            first = placed if placed is not None else route.slots[0]
            order = await self.shared.order([first] if first < len(self.placement.models) else [])
            assign_s = self.assign_s  # (its holder: retried while its liveness key is fresh, _holder)
        else:
            alive = [k for k in route.slots if k in live] or route.slots
            first = self.placement.pick(alive)
            order = [first] + [k for k in alive if k != first]
            assign_s = self.assign_s
        passed: list[str] = []  # engines that did not take it, said in X-Kdiff-Passed
        for slot in order:
            last = slot == order[-1]
            try:
                response = await self._call(
                    slot, req, route.job_id, retry=not last, assign_s=None if last else assign_s
                )
            except _TryAnother as why:
                if route.kind == "job" and follow and slot == placed:
                    return await self._holder(slot, place, req, why.dead)
                if why.dead:
                    self.shared.died(slot)
                passed.append(f"engine{slot} ({'died' if why.dead else 'not assigned'})")
                continue
            if passed:
                response.headers[PASSED_HEADER] = ", ".join(passed)
            return response
        return _error(503, "engine_lost", "no engine replica is up", 5)

    async def _call(
        self,
        slot: int,
        req: dict[str, Any],
        job_id: str | None,
        retry: bool = False,
        assign_s: float | None = None,
    ) -> Response:
        """The engine's response. With ``retry``, raises _TryAnother when the engine died before
        answering, or (``assign_s``) Serve gave the request to none of its replicas in that time: a
        dead replica not yet replaced, or one at its ``max_ongoing_requests``."""
        self.placement.inflight[slot] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.placement.inflight[slot] -= 1

        call: _Call | None = None
        try:
            if slot == self.slot and job_id is not None:
                await self.settled(job_id)
            call = self._open(slot, req)
            if assign_s is not None and not await call.assigned(assign_s):
                raise _TryAnother(dead=False)
            first = await call.__anext__()
        except BaseException as exc:
            release()
            if call is not None:
                call.cancel()
            if isinstance(exc, asyncio.CancelledError | _TryAnother):
                raise
            if retry and isinstance(exc, DEAD):
                raise _TryAnother(dead=True) from exc
            return self._failure(slot, exc)
        headers = [(k, v) for k, v in first["headers"] if k.lower() not in HOP_BY_HOP]
        if job_id is not None and first["status"] == 404 and self.shared is None:
            current = incarnation_of(dict((k.lower(), v) for k, v in headers).get(ENGINE_HEADER))
            if current is not None and current != job_id[2:8]:
                release()
                call.cancel()
                return _error(
                    410,
                    "engine_lost",
                    f"job {job_id!r} ran on engine replica engine{slot}, which has restarted since; "
                    "its jobs are lost (resubmit: the same seed gives the same image)",
                )
        if not first["more"]:
            release()
            response = Response(first["body"], status_code=first["status"])
            response.raw_headers = _raw(headers)
            response.headers["content-length"] = str(len(first["body"]))
            return response
        sse = any(k.lower() == "content-type" and "text/event-stream" in v for k, v in headers)
        engine = dict((k.lower(), v) for k, v in headers).get(ENGINE_HEADER)
        opened = call

        async def rest() -> AsyncIterator[bytes]:
            try:
                if first["body"]:
                    yield first["body"]
                async for chunk in opened:
                    yield chunk
            except DEAD as exc:
                if sse and self.shared is not None and job_id is not None:  # go on where the job went
                    dead = job_prefix(slot, incarnation_of(engine) or "")
                    async for chunk in self._resume(slot, dead, req, job_id):
                        yield chunk
                elif sse:  # the stream ends with an event saying why, never silently
                    data = {"id": job_id, "code": "engine_lost", "message": _lost(slot, exc)}
                    yield f"event: error\ndata: {json.dumps(data)}\n\n".encode()
            finally:
                release()
                opened.cancel()

        response = StreamingResponse(rest(), status_code=first["status"])
        response.raw_headers = _raw(headers)
        return response

    async def _holder(self, slot: int, place: str | None, req: dict[str, Any], dead: bool) -> Response:
        """An unfinished job's request that its holder did not take in time: again while the holder's
        liveness key is fresh (a busy engine), else (it died: Serve would hold the call until its
        restart) from the engine that takes the job over."""
        assert self.shared is not None
        job_id = JOB_PATH.match(req["path"]).group(1)  # type: ignore[union-attr]
        while not dead and slot in await self.shared.live():
            try:
                return await self._call(slot, req, job_id, retry=True, assign_s=self.assign_s)
            except _TryAnother as why:
                dead = why.dead
        self.shared.died(slot)
        return await self._moved(job_id, place, req)

    async def _moved(self, job_id: str | None, dead_place: str | None, req: dict[str, Any]) -> Response:
        """A job request whose engine died: the answer of the engine that takes the job over."""
        assert job_id is not None
        slot = await self._placed(job_id, dead_place)
        if slot is None:
            return _error(503, "engine_lost", f"no engine took job {job_id!r} over yet", 5)
        return await self._call(slot, req, job_id)

    async def _placed(self, job_id: str, dead_place: str | None) -> int | None:
        """The live engine slot a job moved to from ``dead_place`` (or that has it ended), once one
        has; None after three leases and a minute."""
        assert self.shared is not None
        deadline = time.monotonic() + 3 * self.shared.config.lease_s + 60
        while time.monotonic() < deadline:
            place, status = await self.shared.place(job_id)
            slot = Shared.slot_of(place)
            if slot is not None and (place != dead_place or status not in UNFINISHED):
                if slot in await self.shared.live():
                    return slot
            await asyncio.sleep(0.25)
        return None

    async def _resume(
        self, dead: int, dead_place: str, req: dict[str, Any], job_id: str
    ) -> AsyncIterator[bytes]:
        """An event stream whose engine died: the stream from the engine that took the job over (its
        events start again from the job's start), or from the one that has it ended."""
        assert self.shared is not None
        self.shared.died(dead)
        slot = await self._placed(job_id, dead_place)
        response = None if slot is None else await self._call(slot, req, job_id)
        if isinstance(response, StreamingResponse):
            async for chunk in response.body_iterator:
                yield chunk if isinstance(chunk, bytes) else str(chunk).encode()
            return
        if response is not None and response.status_code == 200:
            yield bytes(response.body)
            return
        data = {"id": job_id, "code": "engine_lost", "message": "no engine took the job over in time"}
        yield f"event: error\ndata: {json.dumps(data)}\n\n".encode()

    def _failure(self, slot: int, exc: BaseException) -> Response:
        if isinstance(exc, BackPressureError):
            return _error(503, "overloaded", f"engine{slot} is at its queue limit", exc.retry_after_s or 5)
        if isinstance(exc, DEAD):
            return _error(503, "engine_lost", _lost(slot, exc), 5)
        return _error(500, "engine_error", f"engine{slot}: {type(exc).__name__}: {exc}")

    async def _fanout(self, req: dict[str, Any], slots: list[int]) -> Response:
        """GET /jobs, /models, /metrics: every slot's answer, merged (routing.merge; a slot that fails
        is left out)."""

        async def one(slot: int) -> dict[str, Any]:
            call = self._open(slot, req)
            first = await call.__anext__()
            chunks = [first["body"]] + ([c async for c in call] if first["more"] else [])
            return {"status": first["status"], "headers": first["headers"], "body": b"".join(chunks)}

        answers = await asyncio.gather(*(one(k) for k in slots), return_exceptions=True)
        good = [a for a in answers if isinstance(a, dict)]
        failed = [a for a in good if a["status"] != 200]
        if failed or not good:  # 401, 422 (bad query): every slot says the same; pass the first on
            a = failed[0] if failed else None
            if a is None:
                return _error(503, "engine_lost", "no engine replica answered", 5)
            response = Response(a["body"], status_code=a["status"])
            response.raw_headers = _raw([(k, v) for k, v in a["headers"] if k.lower() not in HOP_BY_HOP])
            response.headers["content-length"] = str(len(a["body"]))
            return response
        answered = [(k, a["body"]) for k, a in zip(slots, answers, strict=True) if isinstance(a, dict)]
        body, media_type = merge(req["path"], answered, _query_int(req["query"], "limit", 100))
        return Response(body, media_type=media_type)


def _request(scope: Scope, body: bytes) -> dict[str, Any]:
    """A request as plain data for a relay (asgi.scope_of makes the scope again on the other side)."""
    client = scope.get("client")
    return {
        "method": scope["method"],
        "path": scope["path"],
        "query": scope.get("query_string", b"").decode("latin-1"),
        "headers": [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
        "body": body,
        "client": None if client is None else list(client),
        "scheme": scope.get("scheme", "http"),
    }


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body already read, then the connection's own messages."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again

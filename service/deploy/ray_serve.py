"""The Ray Serve application: ingress replicas in front of engine replicas (one engine slot per device).

- ``EngineReplica`` (deployments ``engine0`` .. ``engine<N-1>``, one replica each, ``num_gpus`` when on
  GPU) runs the unmodified service app in-process: ``Service`` with one iteration-level engine per
  model, GuardMiddleware (API keys, body limits), every route, schema, error and SSE stream. It loads
  the models of its placement (``KDIFF_MODELS`` for that slot). Its job ids start with its slot and
  incarnation (``service.engine.jobs.Job.id_prefix``). It serves that app on a port of its own for
  the ingress (hop.py), and says where in ``info()``.
- ``Ingress`` receives every HTTP request, from Serve's proxy or (``http_port``) on its own listener,
  and forwards it over HTTP to an engine replica (hop.Engines), streaming the response back
  (SSE included): new work to the least busy slot that has the model, ``/jobs/{id}...`` to the slot
  named in the id, ``GET /jobs`` to every slot (merged). The ingress keeps no job state, so any ingress
  replica serves any job, and results outlive the ingress replica that created them.

Backpressure: past its ongoing + queued requests an ingress replica answers 503 with Retry-After (its
listener; Serve's proxy does the same in front of it), and so it does past an engine slot's ongoing +
queued requests at that slot; an engine's own full queue is the service's 429. An engine
replica that dies: with ``KDIFF_REDIS_URL`` (the shared job store, shared.py) its jobs are taken over
by a live engine, job routes follow Redis's ``place`` of each job, new work goes to live engines and
a request whose engine died before answering goes to another, an SSE stream goes on from the new
holder. Without it the replica takes its jobs with it (their sampler state is in its memory):
requests waiting on it get 503 ``engine_lost``, SSE streams end with an ``error`` event
``engine_lost``, later reads of its jobs 410 ``engine_lost`` (the client resubmits; the same seed
gives the same image); with ``KDIFF_STATE_DIR`` each slot keeps a job store of its own
(``slot_state``) and the replica Serve starts in its place re-runs that slot's accepted jobs.

``serve run service.deploy.ray_serve:build_app engines=2`` or a config file (docker/serve-config.yaml).
"""

# No `from __future__ import annotations`: Serve's class-based FastAPI views need real annotations.
import asyncio
import json
import math
import os
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from service.api.guard import body_limit, error_body, too_large
from service.api.omp import wait_policy_env
from service.api.protocol import with_header_timeout
from service.api.settings import Settings

from .hop import HOP_BY_HOP, Engines, Gone, HopGuard, Listener, NotUp, reuse_port_socket
from .routing import (
    ENGINE_HEADER,
    INGRESS_HEADER,
    Placement,
    Route,
    incarnation_of,
    job_prefix,
    merge,
    new_incarnation,
)
from .shared import EngineBeat, Shared, SharedConfig

APP_NAME = "kdiff"
UNFINISHED = ("queued", "running")
PASSED_HEADER = "x-kdiff-passed"  # engines a request went past (died, or took it in no time)


@serve.deployment(health_check_period_s=2, health_check_timeout_s=30, graceful_shutdown_timeout_s=30)
class EngineReplica:
    """One engine slot: the service app with its engines, on this replica's device."""

    async def __init__(self, slot: int, settings: dict[str, Any], secret: str) -> None:  # type: ignore[misc]
        import ray

        from service.api.app import create_app
        from service.api.settings import Settings
        from service.engine.jobs import Job

        self.slot, self.incarnation = slot, new_incarnation()
        Job.id_prefix = job_prefix(slot, self.incarnation)
        replica = serve.get_replica_context().replica_id.unique_id
        self.name = f"engine{slot}"
        self.header = (ENGINE_HEADER, f"{self.name}; incarnation={self.incarnation}; replica={replica}")
        self.app = create_app(Settings(**slot_state(settings, slot)))
        self._life = self.app.router.lifespan_context(self.app)
        await self._life.__aenter__()  # loads this slot's models, starts their engines
        # the ingress's requests come to this port (hop.py), on the address other nodes reach
        host = ray.util.get_node_ip_address()
        app = _Headed(HopGuard(self.app, secret), [self.header])
        self.listener = Listener(app, reuse_port_socket(host, 0))
        self.url = f"http://{host}:{self.listener.port}"
        # with KDIFF_REDIS_URL: "this engine is up" for the ingress, from now until it stops
        config = SharedConfig.of(self.app.state.service.settings)
        self.beat = None if config is None else EngineBeat(config, slot, self.incarnation)
        if self.beat is not None:
            self.beat.start()

    def info(self) -> dict[str, Any]:
        state = self.app.state.service
        models = sorted(state.pool.models)
        return {"slot": self.slot, "incarnation": self.incarnation, "models": models, "url": self.url}

    def check_health(self) -> None:
        if self.app.state.service.draining:
            raise RuntimeError("draining")
        if not self.listener.alive():
            raise RuntimeError("the engine's HTTP listener stopped")

    async def __del__(self) -> None:  # graceful shutdown: running jobs finish within the drain timeout
        if not hasattr(self, "listener"):  # its start-up failed (Serve says why): nothing was started
            return
        if self.beat is not None:
            await self.beat.stop()
        await self._life.__aexit__(None, None, None)
        await self.listener.stop()


class _Headed:
    """An ASGI app whose responses carry ``headers`` too (the engine replica names itself)."""

    def __init__(self, app: Any, headers: list[tuple[str, str]]) -> None:
        self.app, self.headers = app, [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        await self.app(scope, receive, sending)


proxy = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]


def _error(
    status: int, code: str, message: str, retry_after: float | None = None, *, path: str = ""
) -> Response:
    """The ingress's own error, in the shape the route's clients parse, as the engines answer theirs
    (guard.error_body: OpenAI's under /v1, A1111's under /sdapi, ``{"detail": {"code", "message"}}``)."""
    headers = {} if retry_after is None else {"Retry-After": str(max(1, math.ceil(retry_after)))}
    body = json.dumps(error_body(path, status, message, code))
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _query_int(query: str, name: str, default: int) -> int:
    try:
        return int(parse_qs(query).get(name, [default])[0])
    except ValueError:
        return default


HOLD_S = 120.0  # how long a request waits for its only engine to be up (Serve restarting it)
FANOUT_WAIT_S = 2.0  # GET /jobs, /models, /metrics: a slot not up by then is left out, not waited for


def _lost(slot: int, exc: BaseException) -> str:
    return (
        f"engine replica engine{slot} went away ({type(exc).__name__}); its jobs are lost, Serve restarts "
        "it (resubmit: the same seed gives the same image)"
    )


class _TryAnother(Exception):
    """An engine did not take the request (``dead``: it died); the next engine may."""

    def __init__(self, dead: bool) -> None:
        self.dead = dead


def slot_state(settings: dict[str, Any], slot: int) -> dict[str, Any]:
    """An engine slot's settings with its own job store: ``<KDIFF_STATE_DIR>/engine<slot>`` (a store
    is one process's; the replica Serve starts in place of a dead one re-runs that slot's jobs)."""
    folder = settings.get("state_dir", os.environ.get("KDIFF_STATE_DIR", ""))
    return {**settings, "state_dir": str(Path(folder) / f"engine{slot}")} if folder else dict(settings)


def _kdiff_env() -> dict[str, str]:
    """The engines' environment: KDIFF_* as here, and OpenMP's wait policy (service/api/omp.py)."""
    return {**wait_policy_env(), **{k: v for k, v in os.environ.items() if k.startswith("KDIFF_")}}


class _DirectApp:
    """The ingress replica's own HTTP listener: every request to ``Ingress.forward``, as through Serve's
    proxy (which also cancelled a request whose client went away, so this does too)."""

    def __init__(self, ingress: "Ingress") -> None:
        self.ingress = ingress

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        ingress = self.ingress
        if ingress.ongoing >= ingress.ingress_cap:
            message = "the ingress is at its request limit"
            full = _error(503, "overloaded", message, ingress.retry_after_s, path=scope["path"])
            return await full(scope, receive, send)
        body_read = asyncio.Event()

        async def receiving() -> Any:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_read.set()
            return message

        async def answer() -> None:
            response = await ingress.forward(Request(scope, receiving))
            await response(scope, receiving, send)

        async def gone() -> None:  # the client's disconnect, once its body is in
            await body_read.wait()
            while (await receive())["type"] != "http.disconnect":
                pass

        ingress.ongoing += 1
        work, watch = asyncio.ensure_future(answer()), asyncio.ensure_future(gone())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():  # the client left: a waiting /sample cancels its job, as via Serve
                work.cancel()
            try:
                await work
            except asyncio.CancelledError:
                pass
        finally:
            watch.cancel()
            ingress.ongoing -= 1


# (helpers above the deployments: Serve pickles the ingress class with the globals it sees)
@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(proxy)
class Ingress:
    """Routes each request to an engine slot and streams its response back; keeps no state of its own."""

    async def __init__(  # type: ignore[misc]
        self,
        placement: list[list[str]],
        limits: tuple[int, int],
        shared: SharedConfig | None,
        assign_s: float,
        hop: dict[str, Any],
        *engines: DeploymentHandle,
    ) -> None:
        self.engines = Engines(list(engines), hop["secret"])
        self.placement = Placement(placement)
        self.limits = limits  # the engines' (max_body_bytes, max_chunked_bytes)
        self.header = (INGRESS_HEADER, serve.get_replica_context().replica_id.unique_id)
        # KDIFF_REDIS_URL: jobs are where Redis says, and a dead engine's requests go to a live one
        self.shared = None if shared is None else Shared(shared, len(engines))
        self.assign_s = assign_s
        self.retry_after_s = float(hop["retry_after_s"])
        self.engine_cap = int(hop["engine_cap"])  # requests this replica has in flight at one engine
        # The ingress's own listener (hop.py), in front of Serve's proxy: the fast path. Its replicas
        # on one host share the port; past ``ingress_cap`` requests in flight it answers 503.
        self.ingress_cap, self.ongoing = int(hop["ingress_cap"]), 0
        self.body_timeout_s = float(hop["body_timeout_s"])
        self.listener = None
        if hop.get("port") is not None:
            sock = reuse_port_socket(hop.get("host") or "0.0.0.0", int(hop["port"]))
            self.listener = Listener(
                _DirectApp(self),
                sock,
                http=with_header_timeout(float(hop["header_timeout_s"]), float(hop["send_timeout_s"])),
                keep_alive_s=int(hop["keep_alive_s"]),
                limit_concurrency=int(hop["max_connections"]),
            )

    def check_health(self) -> None:
        if self.listener is not None and not self.listener.alive():
            raise RuntimeError("the ingress's HTTP listener stopped")

    async def __del__(self) -> None:
        if self.listener is not None:
            await self.listener.stop()
        await self.engines.aclose()

    async def _body(self, request: Request) -> bytes | Response:
        """The request body, or a 413 as soon as it passes the engines' limit (the engine would refuse
        it too, but only after this replica had held all of it)."""
        limit, refused = body_limit(request.headers.get("content-length"), *self.limits)
        if refused:
            return self._too_large(request.url.path, limit)

        async def read() -> bytes | Response:
            chunks, seen = [], 0
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > limit:
                    return self._too_large(request.url.path, limit)
                chunks.append(chunk)
            return b"".join(chunks)

        try:  # a body sent a byte a minute would hold one of the listener's slots for good
            return await asyncio.wait_for(read(), self.body_timeout_s)
        except asyncio.TimeoutError:
            message = (
                f"the request body did not arrive within {self.body_timeout_s:g} s (KDIFF_BODY_TIMEOUT_S)"
            )
            return self._refused(request.url.path, 408, message)

    def _too_large(self, path: str, limit: int) -> Response:
        return self._refused(path, 413, too_large(limit))

    def _refused(self, path: str, status: int, message: str) -> Response:
        """A request refused before an engine saw it, in the route's error shape; the connection closes."""
        body = json.dumps(error_body(path, status, message))
        headers = {"Connection": "close", self.header[0]: self.header[1]}
        return Response(body, status_code=status, media_type="application/json", headers=headers)

    @proxy.api_route("/{path:path}", methods=METHODS, include_in_schema=False)
    async def forward(self, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        client = request.client
        req: dict[str, Any] = {
            "method": request.method,
            "path": request.url.path,
            "query": request.url.query,
            "headers": [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw],
            "body": body,
            "client": None if client is None else [client.host, client.port],
            "scheme": request.url.scheme,
        }
        route = self.placement.route(req["method"], req["path"], body)
        if route.kind == "fanout":
            return await self._fanout(req, route.slots)
        if route.kind == "slot":  # an image link: only the replica that made it has the image
            if route.slots[0] >= len(self.engines):
                return _error(404, "not_found", f"no engine slot {route.slots[0]}", path=req["path"])
            return await self._call(route.slots[0], req, None)
        if self.shared is not None:
            return await self._shared_call(route, req)
        if route.kind == "job":
            slot = route.slots[0]
            if slot >= len(self.engines):
                message = f"no job {route.job_id!r} (no engine slot {slot})"
                return _error(404, "unknown_job", message, path=req["path"])
            return await self._call(slot, req, route.job_id)
        # new work: the least busy engine first; one that is down (refused, or no replica up within
        # engine_assign_timeout_s) never had the request, so the next takes it instead of the caller
        # waiting for Serve's restart. One that took it and died is not sent it again (no job store:
        # nothing would hand its job over): the caller gets engine_lost as before. Either way the slot
        # is then tried last for a while (Placement.mark_down).
        order = self.placement.order(route.slots)
        for slot in order:
            last = slot == order[-1]
            try:
                return await self._call(
                    slot,
                    req,
                    None,
                    retry=not last,
                    assign_s=None if last else self.assign_s,
                    resend_taken=False,
                )
            except _TryAnother:  # (marked down by _call)
                continue
        raise AssertionError("unreachable: the last slot is called without retry")

    async def _shared_call(self, route: Route, req: dict[str, Any]) -> Response:
        """With the Redis store: a job's requests go where Redis says it is (else to any engine, which
        reads it from Redis); new work to the least busy live engine with the model. An engine that
        died before answering: the same request to the next one (at-least-once: the same seeds give
        the same images; a job it had recorded is taken over too, so it may run twice). A job's cancel or
        event stream whose engine died goes to the engine that takes the job over, never to another
        (which holds only Redis's copy of it: that copy's stream would never end, its cancel not stop
        the run)."""
        assert self.shared is not None
        live = await self.shared.live()
        follow: tuple[str, str | None] | None = None  # (job id, place) where the job must be followed
        if route.kind == "job":
            job_id = route.job_id
            assert job_id is not None
            place, status = await self.shared.place(job_id)
            placed = Shared.slot_of(place)
            view = req["method"] == "GET" and req["path"].rstrip("/") == f"/jobs/{job_id}"
            if placed is not None and placed not in live and status in UNFINISHED and not view:
                # its engine is gone and nobody took it over yet: cancel, stream or read it where it
                # goes (a plain GET answers at once from any engine: queued)
                return await self._at_taker(job_id, place, req)
            first = placed if placed is not None else route.slots[0]
            order = await self.shared.order([first] if first < len(self.engines) else [])
            assign_s = None
            if placed is not None and status in UNFINISHED and not view:
                follow = (job_id, place)
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
                if why.dead:
                    self.shared.died(slot)
                passed.append(f"engine{slot} ({'died' if why.dead else 'not assigned'})")
                if follow is not None:  # the job's holder is down: wait for the one that takes it over
                    return await self._at_taker(*follow, req)
                continue
            if passed:
                response.headers[PASSED_HEADER] = ", ".join(passed)
            return response
        return _error(503, "engine_lost", "no engine replica is up", 5, path=req["path"])

    async def _call(
        self,
        slot: int,
        req: dict[str, Any],
        job_id: str | None,
        retry: bool = False,
        assign_s: float | None = None,
        resend_taken: bool = True,
    ) -> Response:
        """The engine's response. With ``retry``, raises _TryAnother when the engine refused the
        connection, died before answering (only with ``resend_taken``: it may have started on the
        request), or (``assign_s``) no replica of it told its address in that time: a dead replica not
        yet replaced."""
        if self.placement.inflight[slot] >= self.engine_cap:
            message = f"engine{slot} is at its queue limit"
            return _error(503, "overloaded", message, self.retry_after_s, path=req["path"])
        self.placement.inflight[slot] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.placement.inflight[slot] -= 1

        try:
            # with ``retry`` a refused engine is passed at once, not waited for (Serve restarting it)
            wait_s = HOLD_S if assign_s is None else assign_s
            answer = await self.engines.send(slot, req, wait_s, reask=not retry)
        except BaseException as exc:
            release()
            if isinstance(exc, asyncio.CancelledError):
                raise
            if isinstance(exc, Gone | NotUp):  # down or dying: new work tries the other engines first
                self.placement.mark_down(slot)
            if retry and (
                isinstance(exc, NotUp) or (isinstance(exc, Gone) and (resend_taken or not exc.taken))
            ):
                raise _TryAnother(dead=isinstance(exc, Gone)) from exc
            return self._failure(slot, exc, req["path"])
        headers = [(k, v) for k, v in answer.headers if k.lower() not in HOP_BY_HOP]
        headers.append(self.header)
        if job_id is not None and answer.status == 404 and self.shared is None:
            current = incarnation_of(dict((k.lower(), v) for k, v in headers).get(ENGINE_HEADER))
            if current is not None and current != job_id[2:8]:
                release()
                await answer.close()
                return _error(
                    410,
                    "engine_lost",
                    f"job {job_id!r} ran on engine replica engine{slot}, which has restarted since; "
                    "its jobs are lost (resubmit: the same seed gives the same image)",
                    path=req["path"],
                )
        if not answer.more:
            release()
            response = Response(answer.body, status_code=answer.status)
            response.raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
            response.headers["content-length"] = str(len(answer.body))
            return response
        sse = any(k.lower() == "content-type" and "text/event-stream" in v for k, v in headers)
        engine = dict((k.lower(), v) for k, v in headers).get(ENGINE_HEADER)

        async def rest() -> AsyncIterator[bytes]:
            try:
                async for chunk in answer.chunks():
                    yield chunk
            except Gone as exc:
                if sse and self.shared is not None and job_id is not None:  # go on where the job went
                    dead = job_prefix(slot, incarnation_of(engine) or "")
                    async for chunk in self._resume(slot, dead, req, job_id):
                        yield chunk
                elif sse:  # the stream ends with an event saying why, never silently
                    data = {"id": job_id, "code": "engine_lost", "message": _lost(slot, exc)}
                    yield f"event: error\ndata: {json.dumps(data)}\n\n".encode()
            finally:
                release()
                await answer.close()

        response = StreamingResponse(rest(), status_code=answer.status)
        response.raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        return response

    async def _at_taker(self, job_id: str, dead_place: str | None, req: dict[str, Any]) -> Response:
        """The request at the engine that takes a dead engine's job over, once one has."""
        slot = await self._placed(job_id, dead_place)
        if slot is None:
            message = f"no engine took job {job_id!r} over yet"
            return _error(503, "engine_lost", message, 5, path=req["path"])
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

    def _failure(self, slot: int, exc: BaseException, path: str) -> Response:
        if isinstance(exc, Gone):
            return _error(503, "engine_lost", _lost(slot, exc), self.retry_after_s, path=path)
        if isinstance(exc, NotUp):
            message = f"engine replica engine{slot} is not up (Serve is starting it); retry"
            return _error(503, "engine_lost", message, self.retry_after_s, path=path)
        return _error(500, "engine_error", f"engine{slot}: {type(exc).__name__}: {exc}", path=path)

    async def _fanout(self, req: dict[str, Any], slots: list[int]) -> Response:
        """GET /jobs, /models, /metrics: every slot's answer, merged (routing.merge; a slot that fails
        is left out: refused, or no replica up within FANOUT_WAIT_S; a scrape never waits for a restart)."""

        async def one(slot: int) -> dict[str, Any]:
            answer = await self.engines.send(slot, req, FANOUT_WAIT_S, reask=False)
            try:
                chunks = [answer.body] + ([c async for c in answer.chunks()] if answer.more else [])
            finally:
                await answer.close()
            return {"status": answer.status, "headers": answer.headers, "body": b"".join(chunks)}

        answers = await asyncio.gather(*(one(k) for k in slots), return_exceptions=True)
        good = [a for a in answers if isinstance(a, dict)]
        failed = [a for a in good if a["status"] != 200]
        if failed or not good:  # 401, 422 (bad query): every slot says the same; pass the first on
            a = failed[0] if failed else None
            if a is None:
                return _error(503, "engine_lost", "no engine replica answered", 5, path=req["path"])
            response = Response(a["body"], status_code=a["status"])
            response.raw_headers = [
                (k.lower().encode(), v.encode()) for k, v in a["headers"] if k.lower() not in HOP_BY_HOP
            ]
            response.headers["content-length"] = str(len(a["body"]))
            return response
        answered = [(k, a["body"]) for k, a in zip(slots, answers, strict=True) if isinstance(a, dict)]
        body, media_type = merge(req["path"], answered, _query_int(req["query"], "limit", 100))
        return Response(body, media_type=media_type)


def build_app(args: dict[str, Any]) -> Any:
    """The application (``serve run service.deploy.ray_serve:build_app``; config files pass ``args``).

    args (all optional): ``engines`` (slots, default 1), ``placement`` (a list per slot of model names;
    missing or empty = every model), ``settings`` (KDIFF settings for the engines, e.g.
    ``{"model_store": "/models"}``; KDIFF_* environment variables of the caller are passed on too),
    ``num_gpus`` (per engine replica: 1 on GPU hosts, default 0), ``engine_cpus`` (default 1),
    ``engine_max_ongoing_requests`` (64), ``engine_max_queued_requests`` (64),
    ``ingress_min_replicas`` (1), ``ingress_max_replicas`` (2), ``ingress_target_ongoing_requests`` (32),
    ``ingress_max_ongoing_requests`` (256), ``ingress_max_queued_requests`` (256), ``retry_after_s`` (5),
    ``engine_assign_timeout_s`` (1; with KDIFF_REDIS_URL: new work whose engine refuses it, or whose
    engine's address no replica tells within this, goes to the next engine), ``http_port`` /
    ``http_host`` (the ingress replicas' own listener, the fast path past Serve's proxy, hop.py;
    default none: Serve's proxy only; with it the ingress runs ``ingress_min_replicas`` replicas,
    since Serve sees none of its requests to scale on).

    An ingress replica holds at most ``engine_max_ongoing_requests + engine_max_queued_requests``
    requests at one engine slot (more: 503 ``overloaded``), and its own listener at most
    ``ingress_max_ongoing_requests + ingress_max_queued_requests``.
    """
    n = int(args.get("engines", 1))
    placement = [list(p) for p in args.get("placement") or []]
    placement += [[] for _ in range(n - len(placement))]
    settings = dict(args.get("settings") or {})
    store = settings.get("model_store") or os.environ.get("KDIFF_MODEL_STORE") or "model_store"
    if Path(store).is_dir():  # replicas do not share the caller's working directory
        settings["model_store"] = str(Path(store).resolve())
    retry = float(args.get("retry_after_s", 5))
    backpressure = {"status_code": 503, "retry_after_s": retry}
    secret = secrets.token_hex(16)  # the engines' ports take requests from this application's ingress only
    engines = []
    for k in range(n):
        slot_settings = dict(settings)
        if placement[k]:
            slot_settings["models"] = placement[k]
        engines.append(
            EngineReplica.options(  # type: ignore[attr-defined]
                name=f"engine{k}",
                num_replicas=1,
                max_ongoing_requests=int(args.get("engine_max_ongoing_requests", 64)),
                max_queued_requests=int(args.get("engine_max_queued_requests", 64)),
                backpressure_config=backpressure,  # what the ingress answers when this slot is full
                ray_actor_options={
                    "num_cpus": float(args.get("engine_cpus", 1)),
                    "num_gpus": float(args.get("num_gpus", 0)),
                    "runtime_env": {"env_vars": _kdiff_env()},
                },
            ).bind(k, slot_settings, secret)
        )
    ingress_ongoing = int(args.get("ingress_max_ongoing_requests", 256))
    ingress_queued = int(args.get("ingress_max_queued_requests", 256))
    port = args.get("http_port")
    replicas: dict[str, Any] = {
        "autoscaling_config": {
            "min_replicas": int(args.get("ingress_min_replicas", 1)),
            "max_replicas": int(args.get("ingress_max_replicas", 2)),
            "target_ongoing_requests": float(args.get("ingress_target_ongoing_requests", 32)),
        }
    }
    if port is not None:  # Serve's autoscaler would count none of the listener's requests
        replicas = {"num_replicas": max(1, int(args.get("ingress_min_replicas", 1)))}
    ingress = Ingress.options(  # type: ignore[attr-defined]
        max_ongoing_requests=ingress_ongoing,
        max_queued_requests=ingress_queued,
        backpressure_config=backpressure,
        **replicas,
    )
    limits = Settings(**settings)  # KDIFF_* from the environment as the engines read them
    shared, assign_s = SharedConfig.of(limits), float(args.get("engine_assign_timeout_s", 1.0))
    hop = {
        "secret": secret,
        "port": None if port is None else int(port),
        "host": args.get("http_host", "0.0.0.0"),
        "retry_after_s": retry,
        "engine_cap": int(args.get("engine_max_ongoing_requests", 64))
        + int(args.get("engine_max_queued_requests", 64)),
        "ingress_cap": ingress_ongoing + ingress_queued,
        # the public listener's guards, as `kdiff serve` sets them (KDIFF_*_TIMEOUT_S, ...)
        "body_timeout_s": limits.body_timeout_s,
        "header_timeout_s": limits.header_timeout_s,
        "send_timeout_s": limits.send_timeout_s,
        "keep_alive_s": limits.keep_alive_s,
        "max_connections": limits.max_connections,
    }
    return ingress.bind(
        placement, (limits.max_body_bytes, limits.max_chunked_bytes), shared, assign_s, hop, *engines
    )

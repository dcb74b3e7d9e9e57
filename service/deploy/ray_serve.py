"""The Ray Serve application: ingress replicas in front of engine replicas (one engine slot per device).

- ``EngineReplica`` (deployments ``engine0`` .. ``engine<N-1>``, one replica each, ``num_gpus`` when on
  GPU) runs the unmodified service app in-process: ``Service`` with one iteration-level engine per
  model, GuardMiddleware (API keys, body limits), every route, schema, error and SSE stream. It loads
  the models of its placement (``KDIFF_MODELS`` for that slot). Its job ids start with its slot and
  incarnation (``service.engine.jobs.Job.id_prefix``).
- ``Ingress`` (autoscaled on ongoing requests) receives every HTTP request from Serve's proxy and
  forwards it, as data, to an engine replica through a deployment handle, streaming the response back
  (SSE included): new work to the least busy slot that has the model, ``/jobs/{id}...`` to the slot
  named in the id, ``GET /jobs`` to every slot (merged). The ingress keeps no job state, so any ingress
  replica serves any job, and results outlive the ingress replica that created them.

Backpressure: the ingress deployment's ``max_queued_requests`` makes Serve's proxy answer 503 with
Retry-After; an engine slot's ``max_queued_requests`` makes its handle raise BackPressureError, which the
ingress answers as 503 with Retry-After; an engine's own full queue is the service's 429. An engine
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
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs

from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from service.api.guard import body_limit, error_body, too_large
from service.api.omp import wait_policy_env
from service.api.settings import Settings

from .asgi import run_asgi
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
HOP_BY_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive"}


@serve.deployment(health_check_period_s=2, health_check_timeout_s=30, graceful_shutdown_timeout_s=30)
class EngineReplica:
    """One engine slot: the service app with its engines, on this replica's device."""

    async def __init__(self, slot: int, settings: dict[str, Any]) -> None:  # type: ignore[misc]
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
        # with KDIFF_REDIS_URL: "this engine is up" for the ingress, from now until it stops
        config = SharedConfig.of(self.app.state.service.settings)
        self.beat = None if config is None else EngineBeat(config, slot, self.incarnation)
        if self.beat is not None:
            self.beat.start()

    async def http(self, req: dict[str, Any]) -> AsyncIterator[Any]:
        async for message in run_asgi(self.app, req, [self.header]):
            yield message

    def info(self) -> dict[str, Any]:
        state = self.app.state.service
        return {"slot": self.slot, "incarnation": self.incarnation, "models": sorted(state.pool.models)}

    def check_health(self) -> None:
        if self.app.state.service.draining:
            raise RuntimeError("draining")

    async def __del__(self) -> None:  # graceful shutdown: running jobs finish within the drain timeout
        if self.beat is not None:
            await self.beat.stop()
        await self._life.__aexit__(None, None, None)


proxy = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]


def _error(status: int, code: str, message: str, retry_after: float | None = None) -> Response:
    headers = {} if retry_after is None else {"Retry-After": str(max(1, math.ceil(retry_after)))}
    body = json.dumps({"detail": {"code": code, "message": message}})
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _query_int(query: str, name: str, default: int) -> int:
    try:
        return int(parse_qs(query).get(name, [default])[0])
    except ValueError:
        return default


def _lost(slot: int, exc: BaseException) -> str:
    return (
        f"engine replica engine{slot} went away ({type(exc).__name__}); its jobs are lost, Serve restarts "
        "it (resubmit: the same seed gives the same image)"
    )


def _stream(handle: DeploymentHandle, req: dict[str, Any]) -> DeploymentResponseGenerator:
    return cast(DeploymentResponseGenerator, handle.options(stream=True).http.remote(req))


class _TryAnother(Exception):
    """An engine did not take the request (``dead``: it died); the next engine may."""

    def __init__(self, dead: bool) -> None:
        self.dead = dead


async def _assigned(gen: DeploymentResponseGenerator, timeout_s: float) -> bool:
    """Whether Serve hands the call to a replica of its deployment within ``timeout_s``. (Serve holds a
    call to a deployment with no running replica until one starts: a dead engine's restart.) Uses the
    handle's private assignment future, the only place Serve exposes it."""
    assignment = getattr(gen, "_fetch_future_result_async", None)
    if assignment is None:  # another Ray version: no timeout (the engines' liveness keys still count)
        return True
    task = asyncio.ensure_future(assignment())
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if done:
        task.result()
        return True
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # cancelled with the call
    return False


def _cancel(gen: DeploymentResponseGenerator) -> None:
    """Cancel a handle call, best effort (on a call that already failed, cancel() re-raises its error)."""
    try:
        gen.cancel()
    except Exception:
        pass


def slot_state(settings: dict[str, Any], slot: int) -> dict[str, Any]:
    """An engine slot's settings with its own job store: ``<KDIFF_STATE_DIR>/engine<slot>`` (a store
    is one process's; the replica Serve starts in place of a dead one re-runs that slot's jobs)."""
    folder = settings.get("state_dir", os.environ.get("KDIFF_STATE_DIR", ""))
    return {**settings, "state_dir": str(Path(folder) / f"engine{slot}")} if folder else dict(settings)


def _kdiff_env() -> dict[str, str]:
    """The engines' environment: KDIFF_* as here, and OpenMP's wait policy (service/api/omp.py)."""
    return {**wait_policy_env(), **{k: v for k, v in os.environ.items() if k.startswith("KDIFF_")}}


# (helpers above the deployments: Serve pickles the ingress class with the globals it sees)
@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(proxy)
class Ingress:
    """Routes each request to an engine slot and streams its response back; keeps no state of its own."""

    def __init__(
        self,
        placement: list[list[str]],
        limits: tuple[int, int],
        shared: SharedConfig | None,
        assign_s: float,
        *engines: DeploymentHandle,
    ) -> None:
        self.engines = list(engines)
        self.placement = Placement(placement)
        self.limits = limits  # the engines' (max_body_bytes, max_chunked_bytes)
        self.header = (INGRESS_HEADER, serve.get_replica_context().replica_id.unique_id)
        # KDIFF_REDIS_URL: jobs are where Redis says, and a dead engine's requests go to a live one
        self.shared = None if shared is None else Shared(shared, len(self.engines))
        self.assign_s = assign_s

    async def _body(self, request: Request) -> bytes | Response:
        """The request body, or a 413 as soon as it passes the engines' limit (the engine would refuse
        it too, but only after this replica had held all of it)."""
        limit, refused = body_limit(request.headers.get("content-length"), *self.limits)
        if refused:
            return self._too_large(request.url.path, limit)
        chunks, seen = [], 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                return self._too_large(request.url.path, limit)
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self, path: str, limit: int) -> Response:
        body = json.dumps(error_body(path, 413, too_large(limit)))
        headers = {"Connection": "close", self.header[0]: self.header[1]}
        return Response(body, status_code=413, media_type="application/json", headers=headers)

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
        if self.shared is not None:
            return await self._shared_call(route, req)
        slot = route.slots[0] if route.kind == "job" else self.placement.pick(route.slots)
        if slot >= len(self.engines):
            return _error(404, "unknown_job", f"no job {route.job_id!r} (no engine slot {slot})")
        return await self._call(slot, req, route.job_id)

    async def _shared_call(self, route: Route, req: dict[str, Any]) -> Response:
        """With the Redis store: a job's requests go where Redis says it is (else to any engine, which
        reads it from Redis); new work to the least busy live engine with the model. An engine that
        died before answering: the same request to the next one (at-least-once: the same seeds give
        the same images; a job it had recorded is taken over too, so it may run twice)."""
        assert self.shared is not None
        live = await self.shared.live()
        if route.kind == "job":
            job_id = route.job_id
            assert job_id is not None
            place, status = await self.shared.place(job_id)
            placed = Shared.slot_of(place)
            view = req["method"] == "GET" and req["path"].rstrip("/") == f"/jobs/{job_id}"
            if placed is not None and placed not in live and status in UNFINISHED and not view:
                # its engine is gone and nobody took it over yet: cancel, stream or read it where it
                # goes (a plain GET answers at once from any engine: queued)
                slot = await self._placed(job_id, place)
                if slot is None:
                    return _error(503, "engine_lost", f"no engine took job {job_id!r} over yet", 5)
                return await self._call(slot, req, job_id)
            first = placed if placed is not None else route.slots[0]
            order = await self.shared.order([first] if first < len(self.engines) else [])
            assign_s = None
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

        gen: DeploymentResponseGenerator | None = None
        try:
            gen = _stream(self.engines[slot], req)
            if assign_s is not None and not await _assigned(gen, assign_s):
                raise _TryAnother(dead=False)
            first = await gen.__anext__()
        except BaseException as exc:
            release()
            if gen is not None:
                _cancel(gen)
            if isinstance(exc, asyncio.CancelledError | _TryAnother):
                raise
            if retry and isinstance(exc, RayActorError | ActorDiedError | ActorUnavailableError):
                raise _TryAnother(dead=True) from exc
            return self._failure(slot, exc)
        headers = [(k, v) for k, v in first["headers"] if k.lower() not in HOP_BY_HOP]
        headers.append(self.header)
        if job_id is not None and first["status"] == 404 and self.shared is None:
            current = incarnation_of(dict((k.lower(), v) for k, v in headers).get(ENGINE_HEADER))
            if current is not None and current != job_id[2:8]:
                release()
                _cancel(gen)
                return _error(
                    410,
                    "engine_lost",
                    f"job {job_id!r} ran on engine replica engine{slot}, which has restarted since; "
                    "its jobs are lost (resubmit: the same seed gives the same image)",
                )
        if not first["more"]:
            release()
            response = Response(first["body"], status_code=first["status"])
            response.raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
            response.headers["content-length"] = str(len(first["body"]))
            return response
        sse = any(k.lower() == "content-type" and "text/event-stream" in v for k, v in headers)
        engine = dict((k.lower(), v) for k, v in headers).get(ENGINE_HEADER)

        async def rest() -> AsyncIterator[bytes]:
            try:
                if first["body"]:
                    yield first["body"]
                async for chunk in gen:
                    yield chunk
            except (RayActorError, ActorDiedError, ActorUnavailableError) as exc:
                if sse and self.shared is not None and job_id is not None:  # go on where the job went
                    dead = job_prefix(slot, incarnation_of(engine) or "")
                    async for chunk in self._resume(slot, dead, req, job_id):
                        yield chunk
                elif sse:  # the stream ends with an event saying why, never silently
                    data = {"id": job_id, "code": "engine_lost", "message": _lost(slot, exc)}
                    yield f"event: error\ndata: {json.dumps(data)}\n\n".encode()
            finally:
                release()
                _cancel(gen)

        response = StreamingResponse(rest(), status_code=first["status"])
        response.raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        return response

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
        if isinstance(exc, RayActorError | ActorDiedError | ActorUnavailableError):
            return _error(503, "engine_lost", _lost(slot, exc), 5)
        return _error(500, "engine_error", f"engine{slot}: {type(exc).__name__}: {exc}")

    async def _fanout(self, req: dict[str, Any], slots: list[int]) -> Response:
        """GET /jobs, /models, /metrics: every slot's answer, merged (routing.merge; a slot that fails
        is left out)."""

        async def one(slot: int) -> dict[str, Any]:
            gen = _stream(self.engines[slot], req)
            first = await gen.__anext__()
            chunks = [first["body"]] + ([c async for c in gen] if first["more"] else [])
            return {"status": first["status"], "headers": first["headers"], "body": b"".join(chunks)}

        answers = await asyncio.gather(*(one(k) for k in slots), return_exceptions=True)
        good = [a for a in answers if isinstance(a, dict)]
        failed = [a for a in good if a["status"] != 200]
        if failed or not good:  # 401, 422 (bad query): every slot says the same; pass the first on
            a = failed[0] if failed else None
            if a is None:
                return _error(503, "engine_lost", "no engine replica answered", 5)
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
    ``engine_assign_timeout_s`` (1; with KDIFF_REDIS_URL: new work that no replica of its engine takes
    within this goes to the next engine).
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
            ).bind(k, slot_settings)
        )
    ingress = Ingress.options(  # type: ignore[attr-defined]
        max_ongoing_requests=int(args.get("ingress_max_ongoing_requests", 256)),
        max_queued_requests=int(args.get("ingress_max_queued_requests", 256)),
        backpressure_config=backpressure,
        autoscaling_config={
            "min_replicas": int(args.get("ingress_min_replicas", 1)),
            "max_replicas": int(args.get("ingress_max_replicas", 2)),
            "target_ongoing_requests": float(args.get("ingress_target_ongoing_requests", 32)),
        },
    )
    limits = Settings(**settings)  # KDIFF_* from the environment as the engines read them
    shared, assign_s = SharedConfig.of(limits), float(args.get("engine_assign_timeout_s", 1.0))
    return ingress.bind(
        placement, (limits.max_body_bytes, limits.max_chunked_bytes), shared, assign_s, *engines
    )

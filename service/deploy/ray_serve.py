"""The Ray Serve application: engine replicas that Serve's proxy calls directly, no ingress hop between.

- ``EngineReplica`` (deployment ``engine``, one replica per engine slot, ``num_gpus`` when on GPU) runs
  the unmodified service app in-process: ``Service`` with one iteration-level engine per model,
  GuardMiddleware (API keys, body limits), every route, schema, error and SSE stream. Its slot is its
  Serve replica rank (0 .. engines-1; a replica Serve starts in place of a dead one gets the same
  rank). It loads the models of its placement (``KDIFF_MODELS`` for that slot). Its job ids start with
  its slot and incarnation (``service.engine.jobs.Job.id_prefix``).
- The deployment's request router (router.py, ``SlotRouter``) runs in Serve's proxy: a job's requests
  go to the replica holding it, anything else to the shortest queue. The replica answers its own
  requests in-process and relays the few that another engine must answer (front.py): the merged
  ``GET /jobs`` / ``/models`` / ``/metrics``, a job another engine holds now, new work for a model
  this slot does not serve.

Backpressure: the deployment's ``max_queued_requests`` makes Serve's proxy answer 503 with Retry-After
(Serve's own text body); an engine's own full queue is the service's 429. An engine replica that dies:
the requests it was answering end with Serve's 500 (a synchronous request is not resent: the client
resubmits, the same seed gives the same image); with ``KDIFF_REDIS_URL`` (the shared job store,
shared.py) its ``/jobs`` jobs are taken over by a live engine, job routes follow Redis's ``place`` of
each job, an event stream relayed by a peer goes on from the new holder, and new work goes to the live
engines. Without it the replica takes its jobs with it (their sampler state is in its memory): later
reads of its jobs 410 ``engine_lost``; with ``KDIFF_STATE_DIR`` each slot keeps a job store of its own
(``slot_state``) and the replica Serve starts in its place re-runs that slot's accepted jobs.

``serve run service.deploy.ray_serve:build_app engines=2`` or a config file (docker/serve-config.yaml).
"""

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from service.api.settings import Settings

from .asgi import run_asgi
from .front import Front
from .router import SlotRouter
from .routing import ENGINE_HEADER, JOB_PATH, job_prefix, new_incarnation
from .shared import EngineBeat, SharedConfig

APP_NAME = "kdiff"
DEPLOYMENT = "engine"


@serve.deployment(health_check_period_s=2, health_check_timeout_s=30, graceful_shutdown_timeout_s=30)
@serve.ingress()
class EngineReplica:
    """One engine slot: the service app with its engines, on this replica's device, answering HTTP."""

    async def __init__(  # type: ignore[misc]
        self,
        settings: dict[str, Any],
        placement: list[list[str]],
        limits: tuple[int, int],
        shared: SharedConfig | None,
        assign_s: float,
    ) -> None:
        from service.api.app import create_app
        from service.engine.jobs import Job

        context = serve.get_replica_context()
        slot = context.rank.rank  # 0 .. engines-1; a replacement gets the dead replica's rank
        self.slot, self.incarnation = slot, new_incarnation()
        Job.id_prefix = job_prefix(slot, self.incarnation)
        replica = context.replica_id.unique_id
        self.name = f"engine{slot}"
        self.header = (ENGINE_HEADER, f"{self.name}; incarnation={self.incarnation}; replica={replica}")
        mine = dict(settings)
        if slot < len(placement) and placement[slot]:
            mine["models"] = placement[slot]
        self.service = create_app(  # (not `app`: Serve's ASGI wrapper has that name)
            Settings(**slot_state(mine, slot))
        )
        self._life = self.service.router.lifespan_context(self.service)
        await self._life.__aenter__()  # loads this slot's models, starts their engines
        # with KDIFF_REDIS_URL: "this engine is up" for its peers' relays, from now until it stops
        config = SharedConfig.of(self.service.state.service.settings)
        self.beat = None if config is None else EngineBeat(config, slot, self.incarnation)
        if self.beat is not None:
            self.beat.start()
        # the handle to the peers, made now: its router learns the replicas before the first relay
        handle = serve.get_deployment_handle(context.deployment, context.app_name)
        self._peers = handle.options(stream=True, method_name="relay")
        self.front = Front(
            self.service, slot, self.incarnation, self.header, placement, limits, shared, assign_s, self._peer
        )

    def __serve_build_asgi_app__(self) -> Front:
        return self.front

    def record_replica_metadata(self) -> dict[str, Any]:
        """Read by the request router (in Serve's proxy and in the peers): which slot this replica is."""
        return {"slot": self.slot, "incarnation": self.incarnation}

    def _peer(self, req: dict[str, Any], slot: int) -> Any:
        """A relay to the replica of ``slot`` (the router picks it by the ``slot`` argument)."""
        return self._peers.remote(req, slot=slot)

    async def relay(self, req: dict[str, Any], slot: int) -> AsyncIterator[Any]:
        """A peer's request (as data) through this replica's own app; ``slot`` is the router's."""
        job = JOB_PATH.match(req["path"])
        if job is not None:
            await self.front.settled(job.group(1))
        async for message in run_asgi(self.service, req, [self.header]):
            yield message

    def info(self) -> dict[str, Any]:
        state = self.service.state.service
        return {"slot": self.slot, "incarnation": self.incarnation, "models": sorted(state.pool.models)}

    def check_health(self) -> None:
        if self.service.state.service.draining:
            raise RuntimeError("draining")

    async def __del__(self) -> None:  # graceful shutdown: running jobs finish within the drain timeout
        beat = getattr(self, "beat", None)
        if beat is not None:
            await beat.stop()
        if hasattr(self, "_life"):  # (Serve calls this after a failed start too)
            await self._life.__aexit__(None, None, None)


def slot_state(settings: dict[str, Any], slot: int) -> dict[str, Any]:
    """An engine slot's settings with its own job store: ``<KDIFF_STATE_DIR>/engine<slot>`` (a store
    is one process's; the replica Serve starts in place of a dead one re-runs that slot's jobs)."""
    folder = settings.get("state_dir", os.environ.get("KDIFF_STATE_DIR", ""))
    return {**settings, "state_dir": str(Path(folder) / f"engine{slot}")} if folder else dict(settings)


def _kdiff_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("KDIFF_")}


def build_app(args: dict[str, Any]) -> Any:
    """The application (``serve run service.deploy.ray_serve:build_app``; config files pass ``args``).

    args (all optional): ``engines`` (slots, default 1), ``placement`` (a list per slot of model names;
    missing or empty = every model), ``settings`` (KDIFF settings for the engines, e.g.
    ``{"model_store": "/models"}``; KDIFF_* environment variables of the caller are passed on too),
    ``num_gpus`` (per engine replica: 1 on GPU hosts, default 0), ``engine_cpus`` (default 1),
    ``engine_max_ongoing_requests`` (64), ``engine_max_queued_requests`` (64: per caller of the
    deployment, Serve's proxy included), ``retry_after_s`` (5), ``engine_assign_timeout_s`` (1; with
    KDIFF_REDIS_URL: a relayed request that no replica of its engine takes within this goes to the
    next engine), ``log_level`` (the engine replicas' log level, ``INFO``: Serve logs every request
    there at INFO, as ``kdiff serve --log-level info`` does). The ``ingress_*`` arguments of the
    earlier topology (an ingress deployment in front of the engines) are accepted and ignored.
    """
    n = int(args.get("engines", 1))
    placement = [list(p) for p in args.get("placement") or []]
    placement += [[] for _ in range(n - len(placement))]
    settings = dict(args.get("settings") or {})
    store = settings.get("model_store") or os.environ.get("KDIFF_MODEL_STORE") or "model_store"
    if Path(store).is_dir():  # replicas do not share the caller's working directory
        settings["model_store"] = str(Path(store).resolve())
    retry = float(args.get("retry_after_s", 5))
    limits = Settings(**settings)  # KDIFF_* from the environment as the engines read them
    shared, assign_s = SharedConfig.of(limits), float(args.get("engine_assign_timeout_s", 1.0))
    # (a class or its import path)
    router = RequestRouterConfig(request_router_class=SlotRouter)  # type: ignore[arg-type]
    engine = EngineReplica.options(  # type: ignore[attr-defined]
        name=DEPLOYMENT,
        num_replicas=n,
        max_ongoing_requests=int(args.get("engine_max_ongoing_requests", 64)),
        max_queued_requests=int(args.get("engine_max_queued_requests", 64)),
        backpressure_config={"status_code": 503, "retry_after_s": retry},
        request_router_config=router,
        logging_config={"log_level": str(args.get("log_level", "INFO")).upper()},
        ray_actor_options={
            "num_cpus": float(args.get("engine_cpus", 1)),
            "num_gpus": float(args.get("num_gpus", 0)),
            "runtime_env": {"env_vars": _kdiff_env()},
        },
    )
    return engine.bind(
        settings, placement, (limits.max_body_bytes, limits.max_chunked_bytes), shared, assign_s
    )

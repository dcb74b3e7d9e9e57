"""The request router of the engine deployment: Serve's proxy sends each HTTP request straight to the
engine replica that should answer it, with no ingress hop in between.

Serve runs a request router in every process that calls a deployment (its HTTP proxy, and each engine
replica's handle to its peers). For each request it is given the candidate replicas and the request:
from the proxy, the pickled ASGI scope (method, path, headers; not the body, which the replica pulls
later); from a peer, the keyword ``slot``. Each replica states its slot and incarnation once, when it
becomes ready (``record_replica_metadata``). What :func:`preference` answers:

- a peer's call for slot k: that slot's replica only (none while it is down: the caller times out);
- ``/jobs/{id}...``: the replica of the slot in the id first (it holds the job), the others after
  (they reach it, or with the Redis store the engine that took the job over). An event stream
  prefers another replica, which relays it, so that the holder's death is not the end of the
  client's stream: with the Redis store the relay goes on from the engine that takes the job over,
  without it the stream ends with an ``engine_lost`` error event (never silently);
- anything else: every replica, and Serve picks the one with the shortest queue (it probes and
  caches the queue lengths). A request for a model this slot does not serve is passed on by the
  replica itself (front.py).
"""

from __future__ import annotations

import pickle
import random
from collections.abc import Sequence
from typing import Any, TypeVar

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from .routing import JOB_PATH, slot_of_job

R = TypeVar("R")


def http_target(args: Sequence[Any]) -> tuple[str, str] | None:
    """(method, path) of a request from Serve's HTTP proxy (its one argument: the pickled request
    with the ASGI scope), or None for anything else."""
    if len(args) != 1 or not isinstance(args[0], bytes):
        return None
    try:
        scope = pickle.loads(args[0]).asgi_scope  # the proxy's own pickle of its own object
    except Exception:
        return None
    if not isinstance(scope, dict) or scope.get("type") != "http":
        return None
    return str(scope.get("method", "")), str(scope.get("path", ""))


def preference(
    by_slot: dict[int, R], rest: list[R], args: Sequence[Any], kwargs: dict[str, Any]
) -> list[list[R]]:
    """Ranks of replicas for one request (see the module's doc). ``by_slot``: the replicas whose slot is
    known; ``rest``: the others (a replica whose metadata has not arrived yet)."""
    everyone = list(by_slot.values()) + rest
    if "slot" in kwargs:  # a peer's relay: exactly that slot, nothing else will do
        target = by_slot.get(int(kwargs["slot"]))
        return [[target]] if target is not None else []
    http = http_target(args)
    m = JOB_PATH.match(http[1]) if http else None
    if m is None:  # Serve takes the shortest queue among them, the first on a tie: shuffled
        random.shuffle(everyone)
        return [everyone]
    holder = by_slot.get(slot_of_job(m.group(1))[0])
    others = [r for r in everyone if r is not holder]
    if holder is None:
        return [others]
    if others and http is not None and http[1].rstrip("/").endswith("/events"):
        return [others, [holder]]
    return [[holder], others] if others else [[holder]]


class SlotRouter(RequestRouter):
    """Routes by engine slot (job ids, peers' relays) and otherwise to the shortest queue."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is None:  # Serve asks without a request (probing): any replica
            return [candidate_replicas]
        # back off between rounds instead of spinning while the wanted replica is down or full
        pending_request.routing_context.should_backoff = True
        by_slot: dict[int, RunningReplica] = {}
        rest: list[RunningReplica] = []
        for r in candidate_replicas:
            slot = r.replica_metadata.get("slot")
            if isinstance(slot, int):
                by_slot[slot] = r
            else:
                rest.append(r)
        ranks = preference(by_slot, rest, pending_request.args, pending_request.kwargs)
        return [rank for rank in ranks if rank]

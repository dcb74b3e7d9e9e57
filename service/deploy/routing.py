"""Which engine slot serves a request (pure: no Ray, so it is tested on its own).

Every engine replica is one *slot* (a Serve deployment ``engine<k>`` with one replica, on one device).
A job id starts with its slot (2 hex digits) and the incarnation of the replica that created it
(6 hex digits, new at every replica start), so any ingress replica routes ``/jobs/{id}...`` to the
replica holding the job, and knows when that replica has been replaced since (the job is lost).
New work goes to a slot whose placement includes the request's model, the least busy first.
"""

from __future__ import annotations

import json
import random
import re
import secrets
from dataclasses import dataclass

JOB_PATH = re.compile(r"^/jobs/([0-9a-f]{32})(?:/.*)?$")
MODEL_ACTION = re.compile(r"^/models/([^/]+)/(?:load|unload)$")
ENGINE_HEADER = "x-kdiff-engine"  # "engine<k>; incarnation=<hex6>; replica=<serve replica id>"
INGRESS_HEADER = "x-kdiff-ingress"


def job_prefix(slot: int, incarnation: str) -> str:
    return f"{slot:02x}{incarnation}"


def new_incarnation() -> str:
    return secrets.token_hex(3)


def slot_of_job(job_id: str) -> tuple[int, str]:
    """(slot, incarnation) encoded in a job id."""
    return int(job_id[:2], 16), job_id[2:8]


def incarnation_of(engine_header: str | None) -> str | None:
    for part in (engine_header or "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == "incarnation":
            return value
    return None


@dataclass
class Route:
    kind: str  # "job" (one slot, fixed), "fanout" (every slot, GET /jobs), "any" (a slot among `slots`)
    slots: list[int]
    job_id: str | None = None


def requested_model(body: bytes) -> str | None:
    """The `model` field of a JSON body (None when absent or not JSON: the engine answers the 422)."""
    if not body or body[:1] != b"{":
        return None
    try:
        value = json.loads(body).get("model")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


class Placement:
    """The models of each slot (an empty list: every model in the store) and the ingress's own count
    of requests in flight per slot."""

    def __init__(self, models: list[list[str]]) -> None:
        self.models = models
        self.inflight = [0] * len(models)

    def serving(self, model: str | None) -> list[int]:
        everything = list(range(len(self.models)))
        if model is None:
            return everything
        named = [k for k, names in enumerate(self.models) if model in names]
        wildcard = [k for k, names in enumerate(self.models) if not names]
        return named or wildcard or everything  # no slot has it: any (its engine answers 404/422)

    def route(self, method: str, path: str, body: bytes) -> Route:
        m = JOB_PATH.match(path)
        if m:
            slot, _ = slot_of_job(m.group(1))
            return Route("job", [slot], m.group(1))
        if path in ("/jobs", "/jobs/") and method == "GET":
            return Route("fanout", list(range(len(self.models))))
        m = MODEL_ACTION.match(path)
        if m:
            return Route("any", self.serving(m.group(1)))
        return Route("any", self.serving(requested_model(body) if method == "POST" else None))

    def pick(self, slots: list[int]) -> int:
        """The least busy slot among ``slots`` (ties at random)."""
        least = min(self.inflight[k] for k in slots)
        return random.choice([k for k in slots if self.inflight[k] == least])

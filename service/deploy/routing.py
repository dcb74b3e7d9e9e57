"""Which engine slot serves a request (pure: no Ray, so it is tested on its own).

Every engine replica is one *slot* (a Serve deployment ``engine<k>`` with one replica, on one device).
A job id starts with its slot (2 hex digits) and the incarnation of the replica that created it
(6 hex digits, new at every replica start), so any ingress replica routes ``/jobs/{id}...`` to the
replica holding the job, and knows when that replica has been replaced since (the job is lost).
With the Redis job store the job's ``place`` there (the same prefix, of the engine holding it now)
wins (shared.py). New work goes to a slot whose placement includes the request's model, the least
busy first.
"""

from __future__ import annotations

import json
import random
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

JOB_PATH = re.compile(r"^/jobs/([0-9a-f]{32})(?:/.*)?$")
# an OpenAI image link: its token starts with the job-id prefix of the replica that keeps the image;
# its extension is the request's output_format
IMAGE_FILE = re.compile(r"^/v1/images/files/([0-9a-f]{8})[A-Za-z0-9_-]{32}\.(?:png|jpeg|webp)$")
FANOUT = ("/jobs", "/models", "/metrics")  # GET paths every slot answers, merged by the ingress
MODEL_ACTION = re.compile(r"^/models/([^/]+)/(?:load|unload)$")
DOWN_S = 5.0  # a slot that did not take new work is tried after the others for this long
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
    # "job" (one slot, fixed), "slot" (one slot, fixed, not a job: an image link), "fanout" (every slot:
    # FANOUT), "any" (a slot among `slots`)
    kind: str
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
        self.down_until = [0.0] * len(models)  # monotonic time until which a slot is tried last

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
        m = IMAGE_FILE.match(path)
        if m:
            return Route("slot", [slot_of_job(m.group(1))[0]])
        if method == "GET" and path.rstrip("/") in FANOUT:
            return Route("fanout", list(range(len(self.models))))
        m = MODEL_ACTION.match(path)
        if m:
            return Route("any", self.serving(m.group(1)))
        return Route("any", self.serving(requested_model(body) if method == "POST" else None))

    def pick(self, slots: list[int]) -> int:
        """The least busy slot among ``slots`` (ties at random)."""
        least = min(self.inflight[k] for k in slots)
        return random.choice([k for k in slots if self.inflight[k] == least])

    def order(self, slots: list[int]) -> list[int]:
        """Where new work is tried, in turn: the least busy slot that is not marked down, the other such
        slots, then those marked down (a dead engine's slot has nothing in flight: without the mark it
        would be picked first every time)."""
        now = time.monotonic()
        up = [k for k in slots if self.down_until[k] <= now]
        first = [self.pick(up)] if up else []
        return first + [k for k in up if k not in first] + [k for k in slots if k not in up]

    def mark_down(self, slot: int) -> None:
        self.down_until[slot] = time.monotonic() + DOWN_S


# --- merging the answers of every slot (GET /jobs, /models, /metrics) ---

STATE_RANK = {"on_disk": 0, "failed": 1, "loading": 2, "loaded": 3}


def merge_jobs(answers: list[tuple[int, bytes]], limit: int) -> bytes:
    """Every slot's job list, newest first, at most ``limit``; a job two slots list (with the Redis
    store: one ran it, another read it) once, its ended view first."""
    seen: dict[str, dict[str, Any]] = {}
    for _, body in answers:
        for j in json.loads(body):
            if j["id"] not in seen or seen[j["id"]].get("status") in ("queued", "running"):
                seen[j["id"]] = j
    jobs = list(seen.values())
    jobs.sort(key=lambda j: j.get("created_at", 0), reverse=True)
    return json.dumps(jobs[:limit]).encode()


def merge_models(answers: list[tuple[int, bytes]]) -> bytes:
    """One entry per model: its description from the slot where it is furthest along (loaded first),
    ``engines``: its state on each slot; ``memory``: the sums, and each slot's under ``engines``."""
    bodies = [(f"engine{slot}", json.loads(body)) for slot, body in answers]
    models: dict[str, dict[str, Any]] = {}
    for engine, body in bodies:
        for m in body["models"]:
            cur = models.get(m["name"])
            states = {} if cur is None else cur["engines"]
            if cur is None or STATE_RANK.get(m["state"], 0) > STATE_RANK.get(cur["state"], 0):
                models[m["name"]] = cur = {**m, "engines": states}
            states[engine] = m["state"]
    budgets = [b["memory"]["budget_bytes"] for _, b in bodies]
    memory = {
        "budget_bytes": None if None in budgets else sum(budgets),
        "used_bytes": sum(b["memory"]["used_bytes"] for _, b in bodies),
    }
    return json.dumps(
        {
            "default": bodies[0][1]["default"],
            "memory": memory,
            "engines": [{"engine": engine, **b["memory"]} for engine, b in bodies],
            "models": [models[name] for name in sorted(models)],
            "errors": {k: v for _, b in bodies for k, v in b.get("errors", {}).items()},
        }
    ).encode()


def _labelled(sample: str, engine: str) -> str:
    """A Prometheus sample line with an ``engine`` label added."""
    name, brace, rest = sample.partition("{")
    if brace:
        return f'{name}{{engine="{engine}",{rest}'
    name, _, value = sample.partition(" ")
    return f'{name}{{engine="{engine}"}} {value}'


def merge_metrics(answers: list[tuple[int, bytes]]) -> bytes:
    """Prometheus text from every slot as one exposition: each family once (its HELP and TYPE), its
    samples from every slot with an ``engine`` label (a family's lines stay together, as the format
    requires)."""
    head: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for slot, body in answers:
        family = ""
        for line in body.decode().splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                family = line.split(" ", 3)[2]
                if line not in head.setdefault(family, []):
                    head[family].append(line)
            elif line and not line.startswith("#"):
                samples.setdefault(family, []).append(_labelled(line, f"engine{slot}"))
    out = [line for family in head | samples for line in (*head.get(family, []), *samples.get(family, []))]
    return ("\n".join(out) + "\n").encode()


def merge(path: str, answers: list[tuple[int, bytes]], limit: int) -> tuple[bytes, str]:
    """The merged body of a FANOUT path and its media type."""
    path = path.rstrip("/")
    if path == "/metrics":
        return merge_metrics(answers), "text/plain; version=0.0.4; charset=utf-8"
    if path == "/models":
        return merge_models(answers), "application/json"
    return merge_jobs(answers, limit), "application/json"

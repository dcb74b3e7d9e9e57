"""The job store on Redis (``KDIFF_REDIS_URL``), shared by every replica of a scaled-out service.

Keys (``<p>`` is ``KDIFF_REDIS_PREFIX``):

- ``<p>:job:<id>``: a hash: ``owner``, ``kind``, ``model``, ``request`` (codec JSON), ``status``,
  ``created``, ``finished``, ``attempts``, ``error_code``, ``error_message``, ``result`` (seeds and
  parameters), ``png0`` .. ``png<n-1>`` (the result's PNGs), ``place`` (``Job.id_prefix`` of the
  replica holding or that finished it: where the ingress routes the job). No expiry while unfinished;
  ``KDIFF_RESULT_TTL_S`` once it ends.
- ``<p>:lease:<id>``: the holder of an unfinished job (its replica's ``holder`` token), expiring after
  ``KDIFF_REDIS_LEASE_S`` unless renewed: the holder's heartbeat renews it, so a slow engine keeps its
  jobs; a lease that lapsed means a dead holder, and a live replica may claim the job.
- ``<p>:unfinished``: a sorted set of unfinished job ids by acceptance time (what replicas scan).

Every change that decides something is one Lua script (atomic on the server): ``ended`` records a
job's end only if it is still unfinished and the caller holds its lease (or nobody does): the first
end wins, so a job id has exactly one result however many times it ran; ``claim`` takes a job only
if it is unfinished and nobody holds its lease. A single Redis server (or a primary with replicas
behind Sentinel); Redis Cluster is not supported (the scripts touch keys of several jobs).
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, cast

from service.engine import ImageResult, Job

UNFINISHED = ("queued", "running")

_ENDED = """
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'queued' and st ~= 'running' then return 0 end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finished', ARGV[3], 'error_code', ARGV[4],
    'error_message', ARGV[5], 'result', ARGV[6], 'place', ARGV[8])
for i = 9, #ARGV do redis.call('HSET', KEYS[1], 'png' .. (i - 9), ARGV[i]) end
if tonumber(ARGV[7]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[7]) else redis.call('DEL', KEYS[1]) end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], KEYS[4])
return 1
"""

_CLAIM = """
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'queued' and st ~= 'running' then
    if not st then redis.call('ZREM', KEYS[3], KEYS[4]) end
    return false
end
if redis.call('EXISTS', KEYS[2]) == 1 then return false end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'place', ARGV[3], 'status', 'queued')
return redis.call('HMGET', KEYS[1], 'owner', 'kind', 'model', 'request', 'created', 'attempts')
"""

# renew each lease this holder has; re-take one that lapsed with nobody claiming it; report the rest
_RENEW = """
local lost = {}
for i, key in ipairs(KEYS) do
    local holder = redis.call('GET', key)
    if holder == ARGV[1] then redis.call('PEXPIRE', key, ARGV[2])
    elseif not holder then redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
    else table.insert(lost, i) end
end
return lost
"""


@dataclass
class Claimed:
    """An unfinished job a replica took over: what it needs to run it again."""

    id: str
    owner: str | None
    kind: str
    model: str
    request: str
    created: float
    attempts: int


@dataclass
class Stored:
    """A job as stored (``pngs`` of a succeeded one)."""

    id: str
    owner: str | None
    model: str
    status: str
    created: float
    finished: float | None
    error_code: str | None
    error_message: str | None
    result: dict[str, Any] | None
    pngs: list[bytes] | None


def new_holder(place: str) -> str:
    """A replica's lease token: where it is (its job id prefix) and a random part (a new process, a
    new holder, even in the same place)."""
    return f"{place}:{secrets.token_hex(8)}"


class RedisJobs:
    """The jobs of one deployment (``prefix``) on the Redis at ``url``."""

    def __init__(self, url: str, prefix: str, lease_s: float) -> None:
        import redis.asyncio as redis  # only with KDIFF_REDIS_URL

        self.client = redis.Redis.from_url(url, health_check_interval=30)
        self.prefix, self.lease_ms = prefix, max(1, int(lease_s * 1000))
        self._ended = self.client.register_script(_ENDED)
        self._claim = self.client.register_script(_CLAIM)
        self._renew = self.client.register_script(_RENEW)

    def job_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def lease_key(self, job_id: str) -> str:
        return f"{self.prefix}:lease:{job_id}"

    @property
    def unfinished_key(self) -> str:
        return f"{self.prefix}:unfinished"

    async def accepted(self, job: Job, kind: str, request: str, holder: str) -> None:
        """Record an accepted job with its lease, in one transaction; returns once Redis has it."""
        fields: dict[Any, Any] = {  # (the client types keys invariantly)
            "owner": job.owner or "",
            "kind": kind,
            "model": job.model,
            "request": request,
            "status": "queued",
            "created": repr(job.created),
            "attempts": 0,
            "place": Job.id_prefix,
        }
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self.job_key(job.id), mapping=fields)
            pipe.zadd(self.unfinished_key, {job.id: job.created})
            pipe.set(self.lease_key(job.id), holder, px=self.lease_ms)
            await pipe.execute()

    async def ended(self, job: Job, holder: str, keep_s: float) -> int:
        """Record ``job``'s end once: 1 if recorded, 0 if it had ended (or is gone), -1 if another
        replica holds it (it was taken over: this run's end is not its result)."""
        result = job.result if isinstance(job.result, ImageResult) else None
        stored = None if result is None else {"seeds": result.seeds, "parameters": result.parameters}
        error = job.error
        args: list[Any] = [
            holder,
            job.status.value,
            repr(time.time()),
            "" if error is None else error.code.value,
            "" if error is None else error.message,
            "" if stored is None else json.dumps(stored),
            int(keep_s * 1000),
            Job.id_prefix,
            *(result.pngs if result is not None else []),
        ]
        keys = [self.job_key(job.id), self.lease_key(job.id), self.unfinished_key, job.id]
        return int(await self._ended(keys=keys, args=args))

    async def claim(self, job_id: str, holder: str) -> Claimed | None:
        """Take over an unfinished job whose lease lapsed (None: finished, gone, or held)."""
        keys = [self.job_key(job_id), self.lease_key(job_id), self.unfinished_key, job_id]
        got = await self._claim(keys=keys, args=[holder, self.lease_ms, Job.id_prefix])
        if not got:
            return None
        owner, kind, model, request, created, attempts = (_text(v) for v in got)
        return Claimed(job_id, owner or None, kind, model, request, float(created), int(attempts))

    async def orphans(self, page: int = 256) -> list[tuple[str, str]]:
        """(id, model) of unfinished jobs, oldest first, whose lease lapsed (their holder died); every
        unfinished job is looked at, ``page`` at a time."""
        out: list[tuple[str, str]] = []
        start = 0
        while True:
            ids = [_text(i) for i in await self.client.zrange(self.unfinished_key, start, start + page - 1)]
            if not ids:
                return out
            async with self.client.pipeline(transaction=False) as pipe:
                for i in ids:
                    pipe.exists(self.lease_key(i))
                    pipe.hget(self.job_key(i), "model")
                answers = await pipe.execute()
            for k, job_id in enumerate(ids):
                held, model = answers[2 * k], answers[2 * k + 1]
                if not held and model is not None:
                    out.append((job_id, _text(model)))
            start += page

    async def renew(self, job_ids: list[str], holder: str) -> list[str]:
        """Renew this holder's leases; the ids another replica holds now (taken over) come back."""
        if not job_ids:
            return []
        lost = await self._renew(keys=[self.lease_key(i) for i in job_ids], args=[holder, self.lease_ms])
        return [job_ids[int(i) - 1] for i in lost]

    async def get(self, job_id: str) -> Stored | None:
        raw = await self.client.hgetall(self.job_key(job_id))
        if not raw:
            return None
        f = {_text(k): v for k, v in raw.items()}
        pngs = [cast(bytes, f[f"png{i}"]) for i in range(sum(1 for k in f if k.startswith("png")))]
        finished, result = _text(f.get("finished", b"")), _text(f.get("result", b""))
        return Stored(
            job_id,
            _text(f.get("owner", b"")) or None,
            _text(f["model"]),
            _text(f["status"]),
            float(_text(f["created"])),
            float(finished) if finished else None,
            _text(f.get("error_code", b"")) or None,
            _text(f.get("error_message", b"")) or None,
            json.loads(result) if result else None,
            pngs,
        )

    async def forget(self, job_id: str) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self.job_key(job_id), self.lease_key(job_id))
            pipe.zrem(self.unfinished_key, job_id)
            await pipe.execute()

    async def close(self) -> None:
        await self.client.aclose()


def _text(value: Any) -> str:
    """A Redis reply as text (the client returns bytes: PNGs stay bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)

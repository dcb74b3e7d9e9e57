"""What the Ray replicas read from the Redis job store (``KDIFF_REDIS_URL``), beside the engines' own use
of it (service/serving/jobstore/redis_store.py).

- Each engine replica keeps a liveness key ``<p>:engine:<slot>`` (its incarnation, expiring after the
  lease unless renewed: :class:`EngineBeat`), so every ingress replica sends new work only to engines
  that are up, without waiting for Serve to notice a dead one.
- The ingress (:class:`Shared`) reads where a job is now (the ``place`` its holder recorded: a job
  taken over by another engine is routed there) and which engine slots are alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from .routing import slot_of_job

log = logging.getLogger("kdiff.deploy")


@dataclass(frozen=True)
class SharedConfig:
    """The Redis job store's settings as the replicas need them (from KDIFF_REDIS_*)."""

    url: str
    prefix: str
    lease_s: float

    @classmethod
    def of(cls, settings: Any) -> SharedConfig | None:
        url = getattr(settings, "redis_url", "")
        return cls(url, settings.redis_prefix, settings.redis_lease_s) if url else None

    def engine_key(self, slot: int) -> str:
        return f"{self.prefix}:engine:{slot}"


def _client(url: str) -> Any:
    import redis.asyncio as redis

    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)


class EngineBeat:
    """An engine replica's liveness key, renewed every quarter lease until :meth:`stop`."""

    def __init__(self, config: SharedConfig, slot: int, incarnation: str) -> None:
        self.config, self.key, self.value = config, config.engine_key(slot), incarnation
        self.client = _client(config.url)
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        ms = int(self.config.lease_s * 1000)
        while True:
            try:
                await self.client.set(self.key, self.value, px=ms)
            except Exception:  # Redis away for a moment: the next beat tries again
                log.warning("engine liveness key %s: Redis did not answer", self.key)
            await asyncio.sleep(self.config.lease_s / 4)

    async def stop(self) -> None:
        """Stop beating and say so at once (this engine is going: no new work for it)."""
        if self.task is not None:
            self.task.cancel()
        with contextlib.suppress(Exception):
            if await self.client.get(self.key) == self.value.encode():
                await self.client.delete(self.key)
        with contextlib.suppress(Exception):
            await self.client.aclose()


class Shared:
    """The ingress's view of the store: a job's place, the live engine slots (cached a moment)."""

    CACHE_S = 0.5

    def __init__(self, config: SharedConfig, slots: int) -> None:
        self.config, self.slots = config, slots
        self.client = _client(config.url)
        self._live: tuple[float, set[int]] = (0.0, set(range(slots)))
        self.down: dict[int, float] = {}  # slots this ingress saw die, until when it avoids them

    async def place(self, job_id: str) -> tuple[str | None, str | None]:
        """(place, status) of a job as Redis has it: ``place`` is the job id prefix (slot and
        incarnation) of the engine holding it or that finished it. (None, None) when Redis does not
        have it or does not answer: the caller falls back to the slot in the id."""
        try:
            place, status = await self.client.hmget(f"{self.config.prefix}:job:{job_id}", "place", "status")
        except Exception:
            log.warning("Redis did not answer where job %s is", job_id)
            return None, None
        if status is None:
            return None, None
        return (place.decode() if place else None), status.decode()

    @staticmethod
    def slot_of(place: str | None) -> int | None:
        return slot_of_job(place)[0] if place and len(place) >= 2 else None

    async def live(self) -> set[int]:
        """Engine slots with a fresh liveness key and not seen dying here lately (every slot when
        Redis does not answer: then Serve decides)."""
        now = time.monotonic()
        at, live = self._live
        if now - at > self.CACHE_S:
            try:
                values = await self.client.mget([self.config.engine_key(k) for k in range(self.slots)])
                live = {k for k, v in enumerate(values) if v is not None}
            except Exception:
                live = set(range(self.slots))
            self._live = (now, live)
        return {k for k in live if self.down.get(k, 0.0) < now}

    def died(self, slot: int) -> None:
        self.down[slot] = time.monotonic() + self.config.lease_s
        self._live = (0.0, self._live[1])  # read the keys again next time

    async def order(self, first: list[int]) -> list[int]:
        """Slots to try: ``first`` (in its order) then the rest, live ones before the others."""
        live = await self.live()
        rest = [k for k in range(self.slots) if k not in first]
        ranked = first + rest
        return [k for k in ranked if k in live] + [k for k in ranked if k not in live]

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.aclose()

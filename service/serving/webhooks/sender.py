"""The delivery thread: its own event loop, its own HTTP client, a bounded number of attempts at
once (``concurrency``; one host:port at most half of them). A slow, unreachable or hostile receiver
costs this thread's slots only, never the engine's event loop or another job, and leaves other
receivers' deliveries room.

Each attempt: the URL checked again against the allow list, the host resolved and every address
checked (targets.resolve), the connection made to that very address (the URL carries the IP; the
``Host`` header and TLS's server name carry the host name, so certificates are still checked
against the name), redirects not followed, the whole attempt bounded in time and the answer read
up to a bound. 2xx: delivered. A refused target or a redirect: failed for good. Anything else
(connection errors, timeouts, other statuses): retried with exponential back-off and jitter until
the delivery is ``max_age_s`` old.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from .outbox import Attempt, Delivery, Outbox
from .signing import HEADER, signature_header
from .targets import Pattern, TargetRefused, check_url, resolve

log = logging.getLogger("kdiff.webhooks")
MAX_RESPONSE_BYTES = 64 * 1024  # read (and dropped) of a receiver's answer; the rest is not read
USER_AGENT = "kdiffusion-service-webhooks/1"


@dataclass(frozen=True)
class SenderConfig:
    secret: str | None
    patterns: list[Pattern]
    timeout_s: float = 10.0
    max_age_s: float = 86400.0
    retry_base_s: float = 2.0
    retry_cap_s: float = 3600.0
    concurrency: int = 8


def backoff_s(attempts: int, base_s: float, cap_s: float) -> float:
    """Delay before attempt ``attempts + 1``: exponential (base, 2 base, 4 base, ... up to the cap)
    with "equal jitter" (half fixed, half random), so receivers coming back are not hit by every
    sender at once and no retry comes sooner than half its step."""
    step = min(cap_s, base_s * 2 ** max(0, attempts - 1))
    return step / 2 + random.uniform(0, step / 2)


class Outcome:
    delivered, retry, failed = "delivered", "retry", "failed"


class Sender:
    """Runs deliveries in a daemon thread. ``submit`` and ``stop`` may be called from any thread;
    ``lock`` guards the deliveries' fields, which the API reads from the main loop."""

    def __init__(
        self,
        config: SenderConfig,
        outbox: Outbox,
        lock: threading.Lock,
        clock: Callable[[], float] = time.time,
        observe: Callable[[str], None] | None = None,
    ) -> None:
        self.config, self.outbox, self.lock, self.clock = config, outbox, lock, clock
        self.observe = observe  # told each attempt's outcome (metrics)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._running: set[str] = set()  # delivery ids with a task
        self._stop: asyncio.Event | None = None

    # --- control (any thread) ---
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run_loop, name="kdiff-webhooks", daemon=True)
        self._thread.start()
        self._started.wait(10)

    def submit(self, delivery: Delivery) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._spawn, delivery)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Cancel what is in flight (pending deliveries stay in the outbox) and end the thread."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def in_flight(self) -> int:
        """Deliveries not finished (an approximate count, read from any thread)."""
        return len(self._tasks)

    # --- the thread's loop ---
    def _run_loop(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._sem = asyncio.Semaphore(self.config.concurrency)
        self._hosts: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}
        # trust_env=False: no HTTP(S)_PROXY from the environment (a proxy would connect by name,
        # undoing the address pinning); no keep-alive: each attempt connects to its checked address
        limits = httpx.Limits(max_connections=self.config.concurrency, max_keepalive_connections=0)
        self._client = httpx.AsyncClient(
            follow_redirects=False, trust_env=False, limits=limits, timeout=self.config.timeout_s
        )
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._client.aclose()

    def _spawn(self, delivery: Delivery) -> None:
        if delivery.id in self._running:  # handed over twice (resumed at start-up and just ended)
            return
        self._running.add(delivery.id)
        task = asyncio.get_running_loop().create_task(self._deliver(delivery))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: self._running.discard(delivery.id))

    async def _deliver(self, d: Delivery) -> None:
        while d.state == "pending":
            wait = d.next_at - self.clock()
            if wait > 0:
                await asyncio.sleep(wait)
            async with self._host_slot(d.url), self._sem:
                attempt, outcome = await self._attempt(d)
            now = self.clock()
            with self.lock:
                d.record(attempt)
                if d.ephemeral:
                    d.state = Outcome.delivered if outcome == Outcome.delivered else Outcome.failed
                    return
                if outcome == Outcome.retry:
                    c = self.config
                    d.next_at = now + backoff_s(d.attempt_count, c.retry_base_s, c.retry_cap_s)
                    if d.next_at > d.created + c.max_age_s:
                        outcome = Outcome.failed
                        attempt.error = f"{attempt.error}; gave up after {d.attempt_count} attempts"
                d.state = "pending" if outcome == Outcome.retry else outcome
                if d.state != "pending":
                    d.body = b""  # sent for the last time: only its record is kept
            if self.observe is not None:
                self.observe(d.state if d.state != "pending" else Outcome.retry)
            try:
                self.outbox.save(d)
            except Exception:  # a full disk must not end the delivery loop; the row is saved next time
                log.exception("webhook outbox: saving delivery %s failed", d.id)
            level = logging.INFO if d.state == "delivered" else logging.WARNING
            log.log(level, "webhook %s of job %s: %s", d.event, d.job_id, attempt.error or "delivered")

    @asynccontextmanager
    async def _host_slot(self, url: str) -> AsyncIterator[None]:
        """At most half the slots for one host:port, so a slow receiver leaves the others room."""
        key = urlsplit(url).netloc.lower()
        sem, users = self._hosts.setdefault(
            key, (asyncio.Semaphore(max(1, self.config.concurrency // 2)), [0])
        )
        users[0] += 1
        try:
            async with sem:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._hosts[key]

    async def _attempt(self, d: Delivery) -> tuple[Attempt, str]:
        start, t0 = self.clock(), time.monotonic()

        def done(outcome: str, status: int | None = None, error: str | None = None) -> tuple[Attempt, str]:
            return Attempt(start, round(time.monotonic() - t0, 4), status, error), outcome

        try:
            status, location = await asyncio.wait_for(self._post(d), self.config.timeout_s)
        except TargetRefused as exc:
            return done(Outcome.failed, error=f"refused: {exc}")
        except asyncio.TimeoutError:
            return done(Outcome.retry, error=f"no answer within {self.config.timeout_s:g} s")
        except (httpx.HTTPError, OSError) as exc:
            return done(Outcome.retry, error=f"{type(exc).__name__}: {exc}"[:300])
        if 200 <= status < 300:
            return done(Outcome.delivered, status)
        if 300 <= status < 400:
            return done(Outcome.failed, status, f"redirect to {location!r} not followed"[:300])
        return done(Outcome.retry, status, f"the receiver answered {status}")

    async def _post(self, d: Delivery) -> tuple[int, str | None]:
        target = check_url(d.url, self.config.patterns)  # the allow list may have changed since
        address = await resolve(target)
        host = f"[{address}]" if address.version == 6 else str(address)
        headers = {
            "Host": target.host_header,
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "Kdiff-Event": d.event,
            "Kdiff-Delivery": d.id,
        }
        if self.config.secret:
            headers[HEADER] = signature_header(self.config.secret, d.body, int(self.clock()))
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        url = f"{target.scheme}://{host}:{target.port}{target.path}"
        request = self._client.build_request(
            "POST", url, content=d.body, headers=headers, extensions=extensions
        )
        response = await self._client.send(request, stream=True)
        try:
            read = 0
            async for chunk in response.aiter_raw():
                read += len(chunk)
                if read >= MAX_RESPONSE_BYTES:
                    break
        finally:
            await response.aclose()
        return response.status_code, response.headers.get("location")

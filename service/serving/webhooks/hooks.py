"""Webhooks for the service: a job's callback checked at submit, its terminal event written to the
outbox when it ends and handed to the delivery thread, its deliveries shown on ``GET /jobs/{id}``.

Events: ``job.succeeded``, ``job.failed``, ``job.cancelled``. The POSTed JSON (signed, see
signing.py) holds the job's ``id``, ``status``, ``event``, ``model``, the recorded ``parameters``
(seeds included), ``error`` and ``links`` (paths on this service: the job, its events, each
image). A delivery's id is a digest of (job id, event, URL): a job run again after a restart ends
with the same delivery, so a delivered event is not sent twice by this service (receivers should
still treat deliveries as at-least-once and keep the ids they have seen).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sqlite3
import threading
import time
from dataclasses import asdict
from typing import Any, Protocol

from service.engine import ImageResult, Job, JobStatus, Metrics
from service.sampling.errors import InputError

from ..jobstore import StateDB, TerminalEvent
from .outbox import Attempt, Delivery, MemoryOutbox, Outbox, StateOutbox
from .sender import Sender, SenderConfig
from .targets import Target, TargetRefused, check_url, parse_patterns

log = logging.getLogger("kdiff.webhooks")
MAX_PENDING = 10_000  # deliveries waiting at once; beyond it a new one fails at once ("outbox full")
KEPT_PER_PROCESS = 5_000
# Finished deliveries (their record, the body dropped) stay in the outbox this long, then go (every
# PURGE_EVERY_S); pending ones stay until they are delivered or KDIFF_WEBHOOK_MAX_AGE_S old.
KEEP_FINISHED_S = 3600.0
PURGE_EVERY_S = 600.0  # finished deliveries indexed for GET /jobs/{id} (oldest forgotten first)


class Secret(Protocol):
    def get_secret_value(self) -> str: ...


class WebhookSettings(Protocol):
    """What webhooks read from the settings (``service.api.settings.Settings`` has it)."""

    webhook_urls: list[Any]  # "<api key>=<url>" or "*=<url>" (SecretStr: they name keys)
    webhook_secret: Any  # SecretStr | None
    webhook_allow: list[str]
    webhook_max_age_s: float
    webhook_timeout_s: float
    webhook_retry_base_s: float
    webhook_concurrency: int


def key_digest(key: str) -> str:
    """A key's id as the HTTP gate computes it (service/api/guard.key_id: tests check they agree)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def parse_defaults(entries: list[str]) -> dict[str | None, str]:
    """``KDIFF_WEBHOOK_URLS`` entries ``<api key>=<url>`` (``*`` for every key, and for a service
    without keys) -> {key id or None: url}."""
    out: dict[str | None, str] = {}
    for entry in entries:
        cut = max(entry.find("=http://"), entry.find("=https://"))
        if cut <= 0:
            raise ValueError("a KDIFF_WEBHOOK_URLS entry is not '<api key>=<http(s) url>' or '*=<url>'")
        key, url = entry[:cut].strip(), entry[cut + 1 :].strip()
        out[None if key == "*" else key_digest(key)] = url
    return out


def _delivery_id(job_id: str, event: str, url: str) -> str:
    return hashlib.sha256(f"{job_id}\n{event}\n{url}".encode()).hexdigest()[:32]


def event_body(job: Job, delivery_id: str, event: str | None = None) -> bytes:
    """The JSON sent for a job's event (the exact bytes signed): its terminal event by default."""
    status = job.status.value
    result = job.result if isinstance(job.result, ImageResult) else None
    base = f"/jobs/{job.id}"
    n_images = len(result.pngs) if result is not None and job.status == JobStatus.succeeded else 0
    p = job.progress
    payload = {
        "id": job.id,
        "status": status,
        "event": event or f"job.{status}",
        "delivery_id": delivery_id,
        "model": job.model,
        "created_at": job.created,
        "event_at": time.time(),
        "progress": {"step": p.step, "total": p.total, "fraction": round(p.fraction, 4)},
        "parameters": result.parameters if result is not None else job.request.parameters,
        "error": None if job.error is None else {"code": job.error.code.value, "message": job.error.message},
        "links": {
            "job": base,
            "events": f"{base}/events",
            "images": [f"{base}/images/{i}" for i in range(n_images)],
        },
    }
    return json.dumps(payload, default=str, separators=(",", ":")).encode()


class Webhooks:
    """The service's webhooks: submit-time checks, the outbox, the delivery thread. A job's
    terminal event comes from the job store's terminal listener (:meth:`on_terminal`: with a state
    dir inside the transaction that records the job's end, so its delivery is stored with it)."""

    def __init__(
        self, settings: WebhookSettings, db: StateDB | None = None, metrics: Metrics | None = None
    ) -> None:
        self.patterns = parse_patterns(settings.webhook_allow)
        self.enabled = bool(self.patterns)  # an empty allow list: no callback can be accepted
        urls = [getattr(e, "get_secret_value", lambda e=e: e)() for e in settings.webhook_urls]
        self.defaults = parse_defaults(urls)
        self.max_age_s = settings.webhook_max_age_s
        secret = settings.webhook_secret
        self.secret = secret.get_secret_value() if secret is not None else None
        self.outbox: Outbox = StateOutbox(db) if db is not None and self.enabled else MemoryOutbox()
        self.lock = threading.Lock()
        self.sender = Sender(
            SenderConfig(
                self.secret or None,
                self.patterns,
                timeout_s=settings.webhook_timeout_s,
                max_age_s=self.max_age_s,
                retry_base_s=settings.webhook_retry_base_s,
                concurrency=settings.webhook_concurrency,
            ),
            self.outbox,
            self.lock,
            observe=None
            if metrics is None
            else lambda outcome: metrics.webhook_attempts.labels(outcome).inc(),
        )
        self._by_job: dict[str, list[Delivery]] = {}
        self._followers: set[asyncio.Task[None]] = set()
        self._purger: asyncio.Task[None] | None = None
        for url in self.defaults.values():
            try:
                check_url(url, self.patterns)
            except TargetRefused as exc:
                raise RuntimeError(f"KDIFF_WEBHOOK_URLS: {url!r} is refused: {exc}") from None
        if self.patterns and not self.secret:
            log.warning("KDIFF_WEBHOOK_ALLOW is set but KDIFF_WEBHOOK_SECRET is empty: webhooks go unsigned")

    # --- lifecycle ---
    async def start(self) -> None:
        """Start the delivery thread and resume the outbox's pending deliveries."""
        if not self.enabled:
            return
        await self._purge()
        kept = await asyncio.to_thread(self.outbox.load, time.time() - self.max_age_s)
        self.sender.start()
        self._purger = asyncio.get_running_loop().create_task(self._purge_every(PURGE_EVERY_S))
        with self.lock:
            for d in kept:
                self._index(d)
        for d in kept:
            if d.state == "pending":
                self.sender.submit(d)
        resumed = sum(d.state == "pending" for d in kept)
        if resumed:
            log.info("webhooks: %d pending deliveries resumed from the outbox", resumed)

    async def _purge(self) -> None:
        now = time.time()
        await asyncio.to_thread(self.outbox.purge, now - self.max_age_s, now - KEEP_FINISHED_S)

    async def _purge_every(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                await self._purge()
            except Exception:
                log.exception("webhook outbox: purging old deliveries failed")

    async def stop(self) -> None:
        """Stop delivering; pending deliveries stay in the outbox (a stored one is resumed at the
        next start). Before the job store closes: the last attempts' rows go through it."""
        for task in [*self._followers, *([self._purger] if self._purger else [])]:
            task.cancel()
        await asyncio.to_thread(self.sender.stop)
        self.outbox.close()

    # --- jobs ---
    def _url_for(self, url: str | None, owner: str | None) -> str | None:
        return url if url is not None else self.defaults.get(owner, self.defaults.get(None))

    def target(self, url: str | None, owner: str | None) -> Target | None:
        """The callback of a job being submitted: its own ``callback_url``, else its key's default
        (``KDIFF_WEBHOOK_URLS``), else none. InputError naming ``callback_url`` when refused."""
        url = self._url_for(url, owner)
        if url is None:
            return None
        try:
            return check_url(url, self.patterns)
        except TargetRefused as exc:
            raise InputError("callback_url", f"callback_url refused: {exc}") from None

    def on_terminal(self, event: TerminalEvent, conn: sqlite3.Connection | None) -> None:
        """The job store's terminal listener: the job's terminal event into the outbox (in the
        store's transaction when ``conn`` is given) and on to the delivery thread. A URL that the
        allow list refuses by now fails at its first attempt, recorded."""
        url = self._url_for(event.request.callback_url, event.job.owner)
        if url is not None:
            self.enqueue(event.job, url, conn)

    def enqueue(self, job: Job, url: str, conn: sqlite3.Connection | None = None) -> None:
        event = f"job.{job.status.value}"
        delivery_id = _delivery_id(job.id, event, url)
        now = time.time()
        d = Delivery(delivery_id, job.id, job.owner, url, event, event_body(job, delivery_id), now)
        if self.sender.in_flight >= MAX_PENDING:
            d.state = "failed"
            d.record(Attempt(now, 0.0, None, f"not sent: {MAX_PENDING} deliveries pending (outbox full)"))
        added = StateOutbox.insert(conn, d) if conn is not None else self.outbox.add(d)
        if not added:  # stored already: this event was sent (or is being sent) before
            return
        with self.lock:
            self._index(d)
        if d.state == "pending":
            self.sender.submit(d)
        else:
            log.warning("webhook outbox full (%d pending): %s of job %s dropped", MAX_PENDING, event, job.id)

    def follow_progress(self, job: Job, target: Target, progress_s: float) -> None:
        """``job.started``, then at most one ``job.progress`` per ``progress_s`` while ``job`` runs."""
        task = asyncio.get_running_loop().create_task(self._progress(job, target.url, progress_s))
        self._followers.add(task)
        task.add_done_callback(self._followers.discard)

    async def _progress(self, job: Job, url: str, progress_s: float) -> None:
        last, sent = None, None  # monotonic time and delivery of the latest event sent
        while not job.status.finished:
            changed = job.change_event()  # taken before the state is read
            if job.status != JobStatus.running:
                await changed.wait()
                continue
            now = time.monotonic()
            if last is None or (now - last >= progress_s and sent is not None and sent.state != "pending"):
                sent = self._send_once(job, url, "job.progress" if last else "job.started")
                last = now
            try:  # until the next one is due (not woken at every step) or the job ends
                await asyncio.wait_for(job.wait_done(), max(0.05, last + progress_s - now))
            except asyncio.TimeoutError:
                pass

    def _send_once(self, job: Job, url: str, event: str) -> Delivery:
        delivery_id = _delivery_id(job.id, f"{event}@{time.time()}", url)
        body = event_body(job, delivery_id, event)
        d = Delivery(delivery_id, job.id, job.owner, url, event, body, time.time(), ephemeral=True)
        self.sender.submit(d)
        return d

    def _index(self, d: Delivery) -> None:
        self._by_job.setdefault(d.job_id, []).append(d)
        while len(self._by_job) > KEPT_PER_PROCESS:
            oldest = next(iter(self._by_job))
            if any(x.state == "pending" for x in self._by_job[oldest]):
                break
            del self._by_job[oldest]

    def view(self, job_id: str) -> list[dict[str, Any]]:
        """The job's deliveries for ``GET /jobs/{id}``: URL, event, state, attempts."""
        with self.lock:
            return [
                {
                    "id": d.id,
                    "url": d.url,
                    "event": d.event,
                    "state": d.state,
                    "attempt_count": d.attempt_count,
                    "next_attempt_at": d.next_at if d.state == "pending" and d.attempt_count else None,
                    "attempts": [asdict(a) for a in d.attempts],
                }
                for d in self._by_job.get(job_id, [])
            ]

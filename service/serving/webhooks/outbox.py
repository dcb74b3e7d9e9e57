"""The webhook outbox: every delivery, its attempts and its state, kept where a restart finds it.

A :class:`Delivery` is added when its job ends, before any attempt, and saved after each attempt,
so a restart (even ``kill -9``) resumes the pending ones. ``StateOutbox`` is a table in the durable
job store's SQLite file under ``KDIFF_STATE_DIR`` (the terminal delivery is inserted in the same
transaction as the job's end); ``MemoryOutbox`` (``KDIFF_STATE_DIR`` empty) keeps them in this
process only. The sender sees the narrow :class:`Outbox` interface only.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from ..jobstore import StateDB

log = logging.getLogger("kdiff.webhooks")

KEPT_ATTEMPTS = 20  # the latest attempts kept per delivery (the count covers all of them)


@dataclass
class Attempt:
    at: float  # unix time the attempt started
    duration_s: float
    status_code: int | None = None  # the receiver's answer; None when none came
    error: str | None = None  # why it failed (None: delivered)


@dataclass
class Delivery:
    """One event of one job for one URL."""

    id: str  # stable for (job, event, url): a replayed job's event is the same delivery
    job_id: str
    owner: str | None
    url: str
    event: str  # job.succeeded | job.failed | job.cancelled
    body: bytes  # the exact JSON bytes sent (and signed) on every attempt
    created: float  # unix time of the event
    state: str = "pending"  # pending | delivered | failed
    next_at: float = 0.0  # unix time of the next attempt (pending only)
    attempt_count: int = 0
    attempts: list[Attempt] = field(default_factory=list)
    # job.started / job.progress: tried once, never stored or retried (a later one supersedes it)
    ephemeral: bool = False

    def record(self, attempt: Attempt) -> None:
        self.attempt_count += 1
        self.attempts = [*self.attempts, attempt][-KEPT_ATTEMPTS:]


class Outbox(Protocol):
    def add(self, delivery: Delivery) -> bool:
        """Store a new delivery; False (nothing stored) when one with its id exists."""
        ...

    def save(self, delivery: Delivery) -> None:
        """Store a delivery's state, next attempt time and attempts."""
        ...

    def load(self, since: float) -> list[Delivery]:
        """Deliveries created at or after ``since`` (unix time), oldest first."""
        ...

    def purge(self, before: float, finished_before: float) -> None:
        """Forget deliveries created before ``before``, and finished ones created before
        ``finished_before``."""
        ...

    def close(self) -> None: ...


class MemoryOutbox:
    """This process's memory only: a restart loses pending deliveries."""

    def __init__(self) -> None:
        self._rows: dict[str, Delivery] = {}

    def add(self, delivery: Delivery) -> bool:
        if delivery.id in self._rows:
            return False
        self._rows[delivery.id] = delivery
        return True

    def save(self, delivery: Delivery) -> None:
        if delivery.state == "pending":
            self._rows[delivery.id] = delivery
        else:  # only pending ones are needed here (GET /jobs reads the service's index)
            self._rows.pop(delivery.id, None)

    def load(self, since: float) -> list[Delivery]:
        return sorted((d for d in self._rows.values() if d.created >= since), key=lambda d: d.created)

    def purge(self, before: float, finished_before: float) -> None:
        self._rows = {k: d for k, d in self._rows.items() if d.created >= before}

    def close(self) -> None:
        pass


SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id TEXT PRIMARY KEY, job_id TEXT NOT NULL, owner TEXT, url TEXT NOT NULL, event TEXT NOT NULL,
    body BLOB NOT NULL, created REAL NOT NULL, state TEXT NOT NULL, next_at REAL NOT NULL,
    attempt_count INTEGER NOT NULL, attempts TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_created ON webhook_deliveries (created);
"""
COLUMNS = "id, job_id, owner, url, event, body, created, state, next_at, attempt_count, attempts"
UPSERT = f"INSERT OR {{}} INTO webhook_deliveries ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)"


def _row(d: Delivery) -> tuple[object, ...]:
    attempts = json.dumps([asdict(a) for a in d.attempts])
    return (d.id, d.job_id, d.owner, d.url, d.event, d.body, d.created, d.state, d.next_at,
            d.attempt_count, attempts)  # fmt: skip


class StateOutbox:
    """The ``webhook_deliveries`` table of the durable job store's file (``KDIFF_STATE_DIR``,
    service/serving/jobstore): written by its writer thread; a job's terminal delivery by
    :meth:`insert`, inside the transaction that records the job's end, so a job recorded as ended
    always has its delivery stored."""

    def __init__(self, db: StateDB) -> None:
        self.db = db
        db.add_schema(SCHEMA)

    @staticmethod
    def insert(conn: sqlite3.Connection, delivery: Delivery) -> bool:
        """Store a new delivery in the caller's transaction; False when its id is stored already."""
        return conn.execute(UPSERT.format("IGNORE"), _row(delivery)).rowcount == 1

    def add(self, delivery: Delivery) -> bool:
        return self.db.write(lambda conn: self.insert(conn, delivery)).result()

    def save(self, delivery: Delivery) -> None:
        """Queued to the writer thread (the delivery thread does not wait for the commit)."""
        row = _row(delivery)
        done = self.db.write(lambda conn: conn.execute(UPSERT.format("REPLACE"), row))
        done.add_done_callback(_log_failure)

    def load(self, since: float) -> list[Delivery]:
        def rows(conn: sqlite3.Connection) -> list[Any]:
            query = f"SELECT {COLUMNS} FROM webhook_deliveries WHERE created >= ? ORDER BY created"
            return conn.execute(query, (since,)).fetchall()

        out = []
        for id_, job_id, owner, url, event, body, created, state, next_at, count, attempts in self.db.read(
            rows
        ):
            d = Delivery(id_, job_id, owner, url, event, bytes(body), created, state, next_at, count)
            d.attempts = [Attempt(**a) for a in json.loads(attempts)]
            out.append(d)
        return out

    def purge(self, before: float, finished_before: float) -> None:
        query = "DELETE FROM webhook_deliveries WHERE created < ? OR (state != 'pending' AND created < ?)"
        self.db.write(lambda conn: conn.execute(query, (before, finished_before))).result()

    def close(self) -> None:
        pass  # the job store owns the file


def _log_failure(done: Future[Any]) -> None:
    if done.exception() is not None:
        log.error("webhook outbox: saving a delivery failed: %s", done.exception())

"""The webhook outbox: every delivery, its attempts and its state, kept where a restart finds it.

A :class:`Delivery` is added when its job ends, before any attempt, and saved after each attempt,
so a restart (even ``kill -9``) resumes the pending ones. ``SqliteOutbox`` is one SQLite file (WAL)
under ``KDIFF_STATE_DIR``; ``MemoryOutbox`` (``KDIFF_STATE_DIR`` empty) keeps them in this process
only. Both are behind the narrow :class:`Outbox` interface, so the durable job store can host the
table instead without the sender changing.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

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

    def purge(self, before: float) -> None:
        """Forget deliveries created before ``before``."""
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
        self._rows[delivery.id] = delivery

    def load(self, since: float) -> list[Delivery]:
        return sorted((d for d in self._rows.values() if d.created >= since), key=lambda d: d.created)

    def purge(self, before: float) -> None:
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


class SqliteOutbox:
    """One SQLite file (WAL; each add and save is its own small transaction). Used from the event
    loop (add: microseconds, no fsync per commit with synchronous=NORMAL) and from the delivery
    thread (save), hence one connection behind a lock."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            ok = self._db.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                raise sqlite3.DatabaseError(ok)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise RuntimeError(
                f"the webhook outbox {path} is unreadable or corrupted ({exc}); move it away to start "
                "with an empty outbox (its pending deliveries are then lost)"
            ) from None

    @staticmethod
    def _row(d: Delivery) -> tuple[object, ...]:
        attempts = json.dumps([asdict(a) for a in d.attempts])
        return (d.id, d.job_id, d.owner, d.url, d.event, d.body, d.created, d.state, d.next_at,
                d.attempt_count, attempts)  # fmt: skip

    def add(self, delivery: Delivery) -> bool:
        with self._lock:
            cur = self._db.execute(
                f"INSERT OR IGNORE INTO webhook_deliveries ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                self._row(delivery),
            )
            return cur.rowcount == 1

    def save(self, delivery: Delivery) -> None:
        with self._lock:
            self._db.execute(
                f"REPLACE INTO webhook_deliveries ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                self._row(delivery),
            )

    def load(self, since: float) -> list[Delivery]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {COLUMNS} FROM webhook_deliveries WHERE created >= ? ORDER BY created", (since,)
            ).fetchall()
        out = []
        for id_, job_id, owner, url, event, body, created, state, next_at, count, attempts in rows:
            d = Delivery(id_, job_id, owner, url, event, bytes(body), created, state, next_at, count)
            d.attempts = [Attempt(**a) for a in json.loads(attempts)]
            out.append(d)
        return out

    def purge(self, before: float) -> None:
        with self._lock:
            self._db.execute("DELETE FROM webhook_deliveries WHERE created < ?", (before,))

    def close(self) -> None:
        with self._lock:
            self._db.close()

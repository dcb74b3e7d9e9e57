"""The state file: one SQLite database in WAL mode, written by one thread.

Every write is a function of a connection queued to the writer thread; the thread runs whatever is
queued in one transaction (group commit: a burst of submissions costs one COMMIT), each function
inside its own SAVEPOINT so one that raises rolls back alone. A write's future resolves after its
COMMIT, so an awaited write is on disk (in the WAL: it survives the process being killed; with
``synchronous=NORMAL`` a power loss may drop the last transactions, see docs/RELIABILITY.md).
Nothing here runs on the event loop except queueing.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

log = logging.getLogger("kdiff.state")

T = TypeVar("T")
FILE_NAME = "state.sqlite3"
MAX_BATCH = 512  # writes per transaction at most (a burst larger than this commits in pieces)


class StateCorrupt(RuntimeError):
    """The state file cannot be read as the job store: the message says what to do."""


class StateInUse(StateCorrupt):
    """Another process holds the state dir."""


@dataclass
class _Write:
    fn: Callable[[sqlite3.Connection], Any]
    future: Future[Any] = field(default_factory=Future)


class StateDB:
    """The state file under ``folder`` (created if missing). ``reset``: a file that fails its check is
    moved aside (``state.sqlite3.corrupt-<unix time>``) and a fresh one started; without it such a
    file raises :class:`StateCorrupt`."""

    def __init__(self, folder: Path, reset: bool = False) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.path = folder / FILE_NAME
        self._lock = _lock(folder)
        try:
            self._conn = self._open()
        except sqlite3.DatabaseError as exc:
            if not reset:
                self._lock.close()
                raise StateCorrupt(
                    f"the job store {self.path} is corrupted or not a job store ({exc}). Restore it from a "
                    "backup, move it away, or start once with KDIFF_STATE_RESET=1 to set it aside as "
                    f"{FILE_NAME}.corrupt-<time> and begin with an empty store (its jobs are then lost)"
                ) from exc
            aside = self.path.with_name(f"{FILE_NAME}.corrupt-{int(time.time())}")
            for suffix in ("", "-wal", "-shm"):
                src = self.path.with_name(FILE_NAME + suffix)
                if src.exists():
                    src.replace(aside.with_name(aside.name + suffix))
            log.error("job store %s was corrupted (%s): moved to %s, starting empty", self.path, exc, aside)
            self._conn = self._open()
        self._queue: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self._local = threading.local()
        self._thread = threading.Thread(target=self._run, name="kdiff-state", daemon=True)
        self._thread.start()

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=5000")
            row = conn.execute("PRAGMA quick_check").fetchone()
            if row is None or row[0] != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {row[0] if row else 'no answer'}")
        except BaseException:
            conn.close()
            raise
        return conn

    # --- writing ---
    def write(self, fn: Callable[[sqlite3.Connection], T]) -> Future[T]:
        """Queue ``fn(conn)`` to run in the writer thread inside a transaction; the future resolves
        (with its value or its exception) once that transaction committed. Writes run in order."""
        item = _Write(fn)
        self._queue.put(item)
        return item.future

    async def awrite(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.wrap_future(self.write(fn))

    def add_schema(self, ddl: str) -> None:
        """Run ``CREATE ... IF NOT EXISTS`` statements now (idempotent); blocks until committed."""
        self.write(lambda conn: _script(conn, ddl)).result()

    def _run(self) -> None:
        conn = self._conn
        while True:
            first = self._queue.get()
            if first is None:
                break
            batch, stop = [first], False
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._commit(conn, batch)
            if stop:
                break
        conn.close()

    @staticmethod
    def _commit(conn: sqlite3.Connection, batch: list[_Write]) -> None:
        outcomes: list[tuple[_Write, Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for item in batch:
                conn.execute("SAVEPOINT w")
                try:
                    value = item.fn(conn)
                except Exception as exc:  # this write only
                    conn.execute("ROLLBACK TO w")
                    outcomes.append((item, None, exc))
                else:
                    outcomes.append((item, value, None))
                conn.execute("RELEASE w")
            conn.execute("COMMIT")
        except Exception as exc:  # the transaction itself failed (disk full, I/O error): every write
            log.exception("job store write failed")
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        for item, value, error in outcomes:
            if error is None:
                item.future.set_result(value)
            else:
                item.future.set_exception(error)

    # --- reading ---
    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(conn)`` on this thread's read-only connection (blocking: not on the event loop)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None)
            conn.execute("PRAGMA query_only=1")
            self._local.conn = conn
        return fn(conn)

    def close(self) -> None:
        """Commit what is queued and stop the writer thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._lock.close()  # releases the flock


def _lock(folder: Path) -> IO[str]:
    """One process per state dir: two would each replay the other's unfinished jobs."""
    handle = open(folder / "state.lock", "a+")  # noqa: SIM115 - held open for the store's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.close()
        raise StateInUse(
            f"the job store {folder} is in use by another kdiff process; give each replica its own "
            "KDIFF_STATE_DIR (several replicas sharing one store: the Redis store, docs/RELIABILITY.md)"
        ) from exc
    return handle


def _script(conn: sqlite3.Connection, ddl: str) -> None:
    for statement in ddl.split(";"):
        if statement.strip():
            conn.execute(statement)

"""The jobs table and the result files: what is recorded of a job, when, and what start-up reads back.

A job is recorded when it is accepted (its request as received, seeds settled, owner, kind, model,
``queued``) and again when it ends (status, error, result). Its result's PNGs are files named by
their SHA-256 under ``results/`` (reference-counted in ``blobs``: two jobs with the same image share
one file), written by the writer thread before the transaction that refers to them commits.
Synchronous requests (``kind='sync'``: /sample, A1111, OpenAI) are recorded while they run only:
their result goes back in their response, so their row is deleted when they end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.engine import ImageResult, Job

from .db import StateDB

SCHEMA_VERSION = "1"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    request TEXT NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error_code TEXT,
    error_message TEXT,
    result TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, created);
CREATE TABLE IF NOT EXISTS blobs (sha TEXT PRIMARY KEY, size INTEGER NOT NULL, refs INTEGER NOT NULL);
"""
UNFINISHED = ("queued", "running")
log = logging.getLogger("kdiff.state")

# called inside the transaction that records a job's end (see service.py: terminal listeners)
Recorder = Callable[[sqlite3.Connection], None]


@dataclass
class StoredJob:
    """One row as start-up reads it (``pngs``: a finished job's images, read from their files)."""

    id: str
    owner: str | None
    kind: str
    model: str
    request: str
    status: str
    created: float
    finished: float | None
    attempts: int
    error_code: str | None
    error_message: str | None
    result: dict[str, Any] | None
    pngs: list[bytes] | None = None


class DurableJobs:
    """The jobs table of a :class:`StateDB` and its result files."""

    def __init__(self, db: StateDB) -> None:
        self.db = db
        self.results = db.folder / "results"
        self.results.mkdir(exist_ok=True)
        db.add_schema(SCHEMA)
        version = db.write(_schema_version).result()
        if version != SCHEMA_VERSION:
            raise RuntimeError(
                f"job store {db.path} has schema version {version}; this build reads {SCHEMA_VERSION}"
            )

    # --- a job's life ---
    def accepted(self, job: Job, kind: str, request_json: Callable[[], str]) -> Future[None]:
        """Record an accepted job (``request_json`` runs in the writer thread: images encode there)."""
        row = (job.id, job.owner, kind, job.model, job.created)

        def insert(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR IGNORE INTO jobs (id, owner, kind, model, created, request, status)"
                " VALUES (?, ?, ?, ?, ?, ?, 'queued')",
                (*row, request_json()),
            )

        return self.db.write(insert)

    def ended(self, job: Job, kind: str, then: Recorder | None = None) -> Future[bool]:
        """Record a finished job once (a second end of the same id changes nothing): its status,
        error and result files; ``then(conn)`` runs in the same transaction. True if recorded."""
        status, error, finished = job.status.value, job.error, time.time()
        result = job.result if isinstance(job.result, ImageResult) else None

        def update(conn: sqlite3.Connection) -> bool:
            shas = [hashlib.sha256(p).hexdigest() for p in result.pngs] if result and kind == "job" else []
            stored = (
                None
                if result is None or kind != "job"
                else {"seeds": result.seeds, "parameters": result.parameters, "pngs": shas}
            )
            cur = conn.execute(
                "UPDATE jobs SET status = ?, finished = ?, error_code = ?, error_message = ?, result = ?"
                " WHERE id = ? AND status IN ('queued', 'running')",
                (
                    status,
                    finished,
                    None if error is None else error.code.value,
                    None if error is None else error.message,
                    None if stored is None else json.dumps(stored),
                    job.id,
                ),
            )
            if cur.rowcount != 1:
                return False
            if result is not None and kind == "job":
                for sha, png in zip(shas, result.pngs, strict=True):
                    self._add_blob(conn, sha, png)
            if then is not None:
                _isolated(conn, then)
            if kind != "job":  # a synchronous request's result went back in its response
                conn.execute("DELETE FROM jobs WHERE id = ?", (job.id,))
            return True

        return self.db.write(update)

    def forget(self, job_id: str) -> Future[None]:
        """Delete a job and release its result files (dropped by TTL, count or bytes, or discarded)."""

        def delete(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT result FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return
            conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            for sha in json.loads(row[0])["pngs"] if row[0] else []:
                self._drop_blob(conn, sha)

        return self.db.write(delete)

    # --- start-up ---
    def load(self, ttl_s: float, max_attempts: int) -> tuple[list[StoredJob], list[StoredJob]]:
        """(jobs to replay, finished jobs with their images), oldest first. Expired results are
        deleted; unfinished jobs' replay counts go up (a job at ``max_attempts`` is not replayed:
        it is returned finished, failed); orphaned result files are removed. Blocking."""
        return self.db.write(lambda conn: self._load(conn, ttl_s, max_attempts)).result()

    def _load(self, conn: sqlite3.Connection, ttl_s: float, max_attempts: int) -> tuple[list, list]:
        names = [f for f in StoredJob.__dataclass_fields__ if f != "pngs"]
        rows = []
        for values in conn.execute(f"SELECT {', '.join(names)} FROM jobs ORDER BY created"):
            row = StoredJob(**dict(zip(names, values, strict=True)))
            row.result = json.loads(row.result) if row.result else None  # type: ignore[arg-type]
            rows.append(row)
        cutoff = time.time() - ttl_s
        replay, finished = [], []
        for job in rows:
            if job.status in UNFINISHED:
                replay.append(job)
            elif job.finished is not None and job.finished < cutoff:
                self._forget_row(conn, job)
            else:
                finished.append(job)
        for job in finished:
            job.pngs = self._read_pngs(job)
            if job.pngs is None:  # a result file is gone or altered: say so rather than serve it
                job.status, job.error_code, job.result = "failed", "internal", None
                job.error_message = "the stored result's image files are missing or damaged"
                self._forget_row(conn, job)  # the row stays failed in memory only
        self._sweep_orphans(conn)
        return replay, finished

    def bump_attempts(self, job_ids: list[str]) -> Future[None]:
        def bump(conn: sqlite3.Connection) -> None:
            conn.executemany("UPDATE jobs SET attempts = attempts + 1 WHERE id = ?", [(i,) for i in job_ids])

        return self.db.write(bump)

    # --- result files ---
    def blob_path(self, sha: str) -> Path:
        return self.results / sha[:2] / f"{sha}.png"

    def _add_blob(self, conn: sqlite3.Connection, sha: str, png: bytes) -> None:
        cur = conn.execute("UPDATE blobs SET refs = refs + 1 WHERE sha = ?", (sha,))
        if cur.rowcount:
            return
        path = self.blob_path(sha)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(png)
        os.replace(tmp, path)  # whole or absent, never half a file under its final name
        conn.execute("INSERT INTO blobs (sha, size, refs) VALUES (?, ?, 1)", (sha, len(png)))

    def _drop_blob(self, conn: sqlite3.Connection, sha: str) -> None:
        conn.execute("UPDATE blobs SET refs = refs - 1 WHERE sha = ?", (sha,))
        gone = conn.execute("DELETE FROM blobs WHERE sha = ? AND refs <= 0", (sha,)).rowcount
        if gone:
            self.blob_path(sha).unlink(missing_ok=True)

    def _forget_row(self, conn: sqlite3.Connection, job: StoredJob) -> None:
        conn.execute("DELETE FROM jobs WHERE id = ?", (job.id,))
        for sha in (job.result or {}).get("pngs", []):
            self._drop_blob(conn, sha)

    def _read_pngs(self, job: StoredJob) -> list[bytes] | None:
        pngs = []
        for sha in (job.result or {}).get("pngs", []):
            try:
                data = self.blob_path(sha).read_bytes()
            except OSError:
                return None
            if hashlib.sha256(data).hexdigest() != sha:
                return None
            pngs.append(data)
        return pngs

    def _sweep_orphans(self, conn: sqlite3.Connection) -> None:
        """Files no row refers to: written just before a crash that lost their transaction."""
        known = {sha for (sha,) in conn.execute("SELECT sha FROM blobs")}
        for path in self.results.glob("*/*"):
            if path.stem not in known or path.suffix != ".png":
                path.unlink(missing_ok=True)


def _schema_version(conn: sqlite3.Connection) -> str:
    conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,))
    return str(conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0])


def _isolated(conn: sqlite3.Connection, fn: Recorder) -> None:
    """Run another module's part of a transaction in its own savepoint: its failure is logged and
    undone, the job's own record still commits."""
    conn.execute("SAVEPOINT listener")
    try:
        fn(conn)
    except Exception:
        conn.execute("ROLLBACK TO listener")
        log.exception("a job-end listener failed")
    conn.execute("RELEASE listener")

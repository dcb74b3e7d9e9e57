"""ComfyUI history that outlives a restart (``KDIFF_STATE_DIR``): one table in the service's state
file (``service/serving/jobstore/db.py``: written by its one writer thread, in order).

Each finished prompt's history item is stored (JSON, with its owner, its size as counted against
the key's history bound, and its order) before the ``executing: null`` that tells clients it is
done; deletions and the bound's evictions remove rows. At start-up every key's history is read back
in order, so ``GET /history`` after a restart answers as before it. The images an item names live
in ``KDIFF_COMFY_DIR`` (without it the file folder is temporary and /view of them is then a 404).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS comfy_history (
    owner TEXT NOT NULL, prompt_id TEXT NOT NULL, seq INTEGER NOT NULL, size INTEGER NOT NULL,
    item TEXT NOT NULL, PRIMARY KEY (owner, prompt_id)
);
"""
NO_OWNER = ""  # a server without keys (owner None); key ids are never empty


class HistoryStore:
    def __init__(self, db: Any) -> None:
        self.db = db
        db.add_schema(SCHEMA)

    def load(self) -> list[tuple[str | None, str, dict[str, Any], int]]:
        """Every stored item, oldest first: (owner, prompt id, item, size)."""

        def read(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return conn.execute(
                "SELECT owner, prompt_id, item, size FROM comfy_history ORDER BY seq"
            ).fetchall()

        rows = self.db.read(read)
        return [(o or None, pid, json.loads(item), int(size)) for o, pid, item, size in rows]

    async def put(self, owner: str | None, prompt_id: str, item: dict[str, Any], size: int) -> None:
        text = await asyncio.to_thread(json.dumps, item)  # whole workflows, base64 avatars

        def write(conn: sqlite3.Connection) -> None:
            seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM comfy_history").fetchone()[0]
            conn.execute(
                "INSERT OR REPLACE INTO comfy_history VALUES (?, ?, ?, ?, ?)",
                (owner or NO_OWNER, prompt_id, seq, size, text),
            )

        await self.db.awrite(write)

    def delete(self, owner: str | None, prompt_ids: list[str] | None) -> None:
        """Queued (the caller does not wait): the items named, or all the owner's."""
        who = owner or NO_OWNER

        def write(conn: sqlite3.Connection) -> None:
            if prompt_ids is None:
                conn.execute("DELETE FROM comfy_history WHERE owner = ?", (who,))
            else:
                conn.executemany(
                    "DELETE FROM comfy_history WHERE owner = ? AND prompt_id = ?",
                    [(who, p) for p in prompt_ids],
                )

        self.db.write(write)

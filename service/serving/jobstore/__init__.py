"""The durable job store (``KDIFF_STATE_DIR``): accepted jobs and finished results survive a restart.

- ``db.py``: :class:`StateDB`, the one SQLite file (WAL) and its writer thread; other modules add
  their own tables to it (``add_schema``, ``write``, ``read``);
- ``store.py``: the ``jobs`` table and the content-addressed result files;
- ``codec.py``: a GenerationRequest as JSON and back (images losslessly);
- ``journal.py``: what the Service records when, terminal listeners, and start-up's replay;
- ``redis_store.py``, ``redis_journal.py``: the store shared by replicas (``KDIFF_REDIS_URL``): jobs
  with leases, taken over by a live replica when theirs dies, one result per job id.

docs/RELIABILITY.md has the guarantees. No fastapi here (tests/test_layering.py).
"""

from .db import StateCorrupt, StateDB
from .journal import JOB, SYNC, Journal, Restored, TerminalEvent, TerminalListener, placeholder
from .redis_journal import RedisJournal

__all__ = [
    "JOB",
    "SYNC",
    "Journal",
    "RedisJournal",
    "Restored",
    "StateCorrupt",
    "StateDB",
    "TerminalEvent",
    "TerminalListener",
    "placeholder",
]

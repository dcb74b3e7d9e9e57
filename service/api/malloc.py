"""glibc's malloc in the serving process: two arenas, and free memory handed back to the OS.

glibc gives each thread that allocates its own arena (up to 8 per core). The service allocates from
the event loop, the engine thread and the encoding threads, and freed memory stays fragmented across
those arenas: under steady load RSS crept up by tens of MiB per thousand requests with nothing kept
(measured in tests/reliability/test_memory.py; flat with two arenas). Two arenas is what
``MALLOC_ARENA_MAX=2`` does, set here so ``kdiff serve`` gets it without the variable; a value the
user exported wins.

Even with two arenas glibc keeps what a busier moment allocated: a round of 1,000 requests at 96 at
once instead of 16 left the server +11 MiB (glibc's in-use bytes flat, its heap +9.5 MB), and it
never came back; that is what the memory test's occasional bad runs were (+23 and +61 MiB over
2,000 requests after warm-up). ``malloc_trim(0)`` returns the free pages inside every arena to the
OS (412 -> 400 MiB right after that round), so a daemon thread calls it every few seconds
(docs/RELIABILITY.md has the figures).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
import time

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # from glibc's malloc.h
TRIM_EVERY_S = 5.0  # a trim walks the arenas' free lists: milliseconds, under their locks


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def cap_arenas(arenas: int = 2) -> bool:
    """True when the cap was applied (glibc, and MALLOC_ARENA_MAX not set by the user)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    libc = _libc()
    try:
        return libc is not None and bool(libc.mallopt(M_ARENA_MAX, arenas))
    except AttributeError:  # not glibc (musl, macOS): nothing to cap
        return False


def start_trimming(
    every_s: float = TRIM_EVERY_S, stop: threading.Event | None = None
) -> threading.Thread | None:
    """A daemon thread that hands glibc's free memory back to the OS every ``every_s`` seconds until
    ``stop`` is set (ctypes releases the GIL for the call); None where there is no ``malloc_trim``."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return None
    stopped = stop or threading.Event()

    def loop() -> None:
        while not stopped.wait(every_s):
            t0 = time.perf_counter()
            trim(0)
            log.debug("malloc_trim took %.1f ms", (time.perf_counter() - t0) * 1000)

    thread = threading.Thread(target=loop, name="malloc-trim", daemon=True)
    thread.start()
    return thread

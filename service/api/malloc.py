"""Cap glibc's malloc arenas in the serving process.

glibc gives each thread that allocates its own arena (up to 8 per core). The service allocates from
the event loop, the engine thread and the encoding threads, and freed memory stays fragmented across
those arenas: under steady load RSS crept up by tens of MiB per thousand requests with nothing kept
(measured in tests/reliability/test_memory.py; flat with two arenas). Two arenas is what
``MALLOC_ARENA_MAX=2`` does, set here so ``kdiff serve`` gets it without the variable; a value the
user exported wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_ARENA_MAX = -8  # from glibc's malloc.h


def cap_arenas(arenas: int = 2) -> bool:
    """True when the cap was applied (glibc, and MALLOC_ARENA_MAX not set by the user)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to cap
        return False

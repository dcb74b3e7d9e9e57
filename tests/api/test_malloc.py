"""The serving process's malloc policy: free memory that glibc keeps goes back to the OS."""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from pathlib import Path

import pytest

from service.api.malloc import start_trimming


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc (Linux)")
def test_the_trim_thread_hands_freed_heap_pages_back() -> None:
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "malloc_trim"):
        pytest.skip("not glibc")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    # 96 MiB in 64 KiB blocks (below glibc's mmap threshold: they come from the heap), all freed but
    # the last, which keeps the heap's top in place: glibc cannot shrink it and keeps the pages
    blocks = [libc.malloc(64 * 1024) for _ in range(1536)]
    for b in blocks:
        libc.memset(b, 1, 64 * 1024)  # touch: resident
    held = _rss_mib()
    for b in blocks[:-1]:
        libc.free(b)
    kept = _rss_mib()
    assert held - kept < 48, "glibc returned the pages by itself: the test no longer shows the problem"
    stop = threading.Event()
    thread = start_trimming(every_s=0.05, stop=stop)
    assert thread is not None and thread.daemon
    try:
        deadline = time.monotonic() + 10
        while _rss_mib() > kept - 64 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _rss_mib() <= kept - 64, (held, kept, _rss_mib())
    finally:
        stop.set()
        thread.join(5)
        libc.free(blocks[-1])
    assert not thread.is_alive()

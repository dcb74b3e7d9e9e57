"""Server RSS after rounds of 1,000 requests at a chosen concurrency each (the memory test's load:
tests/reliability/test_memory.py), to see what a busier round leaves behind.

    python bench/bench_memory_peak.py --pattern 16,16,96,16 --idle 6 [--malloc-stats]

After each round: RSS as it ends, RSS after ``--idle`` seconds (kdiff serve's malloc_trim thread
runs every 5 s), and with ``--malloc-stats`` glibc's own totals (heap bytes, in-use bytes) read
through gdb (``malloc_stats()`` prints them to the server's log).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.reliability.support import rss_mib, start  # noqa: E402
from tests.reliability.test_memory import load_round  # noqa: E402
from tests.support.tiny_store import make_tiny_store  # noqa: E402


def malloc_stats(pid: int, log: Path) -> list[str]:
    before = len(log.read_text())
    subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "call (void)malloc_stats()"], capture_output=True)
    time.sleep(0.3)
    lines = log.read_text()[before:].splitlines()
    return [x.split("=")[1].strip() for x in lines if x.startswith(("system bytes", "in use bytes"))][-2:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pattern", default="16,16,96,16", help="concurrency of each 1,000-request round")
    ap.add_argument("--idle", type=float, default=6.0)
    ap.add_argument("--malloc-stats", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    store = make_tiny_store(tmp / "store", image_size=32, channels=3)
    srv = start(store, tmp / "server.log", KDIFF_MAX_RESULTS="500")
    rows = []
    try:
        rnd = random.Random(1)
        for k, conc in enumerate(int(x) for x in args.pattern.split(",")):
            asyncio.run(load_round(srv.url, k * 1000, rnd, conc))
            row = {"round": k, "concurrency": conc, "rss_end": round(rss_mib(srv.proc.pid))}
            if args.malloc_stats:
                row["glibc_heap_inuse"] = malloc_stats(srv.proc.pid, srv.log_path)
            time.sleep(args.idle)
            row["rss_idle"] = round(rss_mib(srv.proc.pid))
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        srv.stop()


if __name__ == "__main__":
    main()

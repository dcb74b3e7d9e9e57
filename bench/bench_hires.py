"""Hires fix: second-pass batching. ``--requests`` hires requests sent at once versus one after
another, against a live `kdiff serve` (tests/support/server.py), interleaved ``--repeats`` times.

Both passes of a hires job run in the engine (its driver continues into the second pass), so
concurrent jobs share model calls in both passes; the mean rows per model call (from /metrics)
shows it. Default model: the tests' tiny random SD 1.x (``sd1``: a 64x64 first pass, 128x128
second); ``--model-store`` / ``--model`` for another.

    python bench/bench_hires.py --requests 4 --repeats 3 --out docs/bench_hires.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.server import Server  # noqa: E402


def body(args: argparse.Namespace, i: int) -> dict[str, Any]:
    hires = {"scale": 2, "upscaler": args.upscaler, "steps": args.hr_steps, "denoise": 0.5}
    return {"model": args.model, "prompt": f"a red cat {i}", "negative_prompt": "the dog", "seed": i,
            "sampler": "euler", "steps": args.steps, "cfg_scale": 5.0, "width": args.size,
            "height": args.size, "hires": hires}  # fmt: skip


def rows_calls(c: httpx.Client, model: str) -> tuple[float, float]:
    text = c.get("/metrics").text
    total = re.search(rf'kdiff_batch_rows_sum{{model="{model}"}} (\S+)', text)
    count = re.search(rf'kdiff_batch_rows_count{{model="{model}"}} (\S+)', text)
    return (float(total.group(1)) if total else 0.0), (float(count.group(1)) if count else 0.0)


def one(c: httpx.Client, b: dict[str, Any]) -> None:
    r = c.post("/sample", json=b, timeout=600)
    r.raise_for_status()


def phase(c: httpx.Client, args: argparse.Namespace, concurrent: bool, base: int) -> dict[str, float]:
    bodies = [body(args, base + i) for i in range(args.requests)]
    rows0, calls0 = rows_calls(c, args.model)
    t0 = time.perf_counter()
    if concurrent:
        with ThreadPoolExecutor(len(bodies)) as pool:
            list(pool.map(lambda b: one(c, b), bodies))
    else:
        for b in bodies:
            one(c, b)
    wall = time.perf_counter() - t0
    rows1, calls1 = rows_calls(c, args.model)
    calls = calls1 - calls0
    return {"wall_s": wall, "calls": calls, "rows_per_call": (rows1 - rows0) / max(calls, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-store", type=Path, default=None, help="default: the tests' tiny SD store")
    ap.add_argument("--model", default="sd1")
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--hr-steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--upscaler", default="Latent")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.model_store is None:
        from tests.support.sd_tiny import tiny_sd_store

        args.model_store = tiny_sd_store()
    log = Path(tempfile.mkdtemp(prefix="bench-hires-")) / "server.log"
    server = Server(args.model_store, log)
    results: dict[str, list[dict[str, float]]] = {"sequential": [], "concurrent": []}
    try:
        server.wait_ready(180)
        with httpx.Client(base_url=server.url, timeout=600) as c:
            phase(c, args, True, 10_000)  # warm-up: load, first calls at both sizes
            for r in range(args.repeats):
                for mode in ("sequential", "concurrent"):  # interleaved
                    results[mode].append(phase(c, args, mode == "concurrent", 100 * r))
    finally:
        server.stop()
    summary = {
        mode: {k: statistics.median(x[k] for x in runs) for k in runs[0]} for mode, runs in results.items()
    }
    speedup = summary["sequential"]["wall_s"] / summary["concurrent"]["wall_s"]
    for mode, s in summary.items():
        calls, rows = s["calls"], s["rows_per_call"]
        print(f"{mode:10s} wall {s['wall_s']:.2f} s  model calls {calls:.0f}  rows/call {rows:.2f}")
    print(f"concurrent vs one after another: {speedup:.2f}x")
    if args.out:
        meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                "load": os.getloadavg(), "args": {k: str(v) for k, v in vars(args).items()}}  # fmt: skip
        args.out.write_text(
            json.dumps({"meta": meta, "runs": results, "median": summary, "speedup": speedup}, indent=1)
        )


if __name__ == "__main__":
    main()

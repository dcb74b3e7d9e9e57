"""Engine overhead: what the engine itself costs per iteration and per row, with a free denoiser.

The denoiser answers its input (no model time), so the wall time of a burst of jobs is the
engine's own work: admission, the plan, concatenating rows, splitting outputs, every job's stepper
(its tensor math and Python), the hand-offs between the event loop and the worker thread. For
1, 8, 32 and 128 jobs started together (each ``--steps`` steps, one image) it reports iterations/s,
rows/s and ms per iteration, then fits ``ms per iteration = a + b * rows`` over those points
(issue 28's targets: a <= 1 ms, b <= 20 us at 32 jobs). ``--profile J`` prints cProfile's top
functions for the burst of J jobs. The heap is settled first as the model pool does after a load
(``serving.pool.settle_heap``: collect, then ``gc.freeze``); ``--no-freeze`` measures without it.

    python bench/bench_engine_overhead.py [--steps 50] [--jobs 1 8 32 128] [--repeats 3]
        [--samplers euler] [--shape 1 32 32] [--out docs/bench_engine_overhead.json] [--profile 32]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import platform
import pstats
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.engine import Engine, EngineConfig, JobRequest, JobStatus, Metrics, ModelHandle  # noqa: E402
from service.sampling.ksampler import SamplingSpec  # noqa: E402
from service.serving.pool import settle_heap  # noqa: E402


class FreeDenoiser:
    """A denoiser that costs nothing (it answers its input): the engine's time is all that is left. Even
    one elementwise op is not free: on 128 rows torch splits it over its threads, which on a busy
    machine took 27 ms a call."""

    sigma_min, sigma_max = 0.02, 80.0

    def __call__(self, x: Tensor, sigma: Tensor, **_: Any) -> Tensor:
        return x


class GcClock:
    """Seconds spent in the cyclic garbage collector (gc.callbacks), and how many collections."""

    def __init__(self) -> None:
        self.seconds, self.collections, self._t0 = 0.0, 0, 0.0
        gc.callbacks.append(self._tick)

    def _tick(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._t0
            self.collections += 1

    def close(self) -> None:
        gc.callbacks.remove(self._tick)


def thread_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds so far of this process's live threads, by thread id, with each one's role: the event
    loop (the main thread), the engine's worker, other (the pool that finalizes results).
    Linux: /proc/self/task/*/schedstat."""
    out = {}
    for thread in threading.enumerate():
        try:
            ns = int(Path(f"/proc/self/task/{thread.native_id}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError, TypeError):
            continue
        role = "loop" if thread is threading.main_thread() else "other"
        out[thread.native_id or 0] = ("worker" if thread.name.startswith("engine-") else role, ns / 1e9)
    return out


def cpu_by_role(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    """CPU seconds each role's threads spent between two ``thread_cpu`` readings (threads alive at the
    second; an earlier burst's worker that ended meanwhile is not counted)."""
    out = {"loop_cpu_s": 0.0, "worker_cpu_s": 0.0, "other_cpu_s": 0.0}
    for tid, (role, seconds) in after.items():
        out[f"{role}_cpu_s"] += seconds - (before[tid][1] if tid in before else 0.0)
    return out


# One event loop for every burst, as a server has: its default thread pool (which finalizes results)
# starts once, not once per burst (thread starts were ~50 us of CPU per job at 128 jobs).
_LOOP = asyncio.new_event_loop()


def burst(jobs: int, steps: int, samplers: list[str], shape: tuple[int, ...]) -> dict[str, float]:
    """Run ``jobs`` one-image jobs started together; wall time, iterations and rows evaluated, and
    the CPU seconds of the event loop, the engine's worker and the other threads."""

    async def go() -> dict[str, float]:
        handle = ModelHandle("free", FreeDenoiser(), shape, torch.device("cpu"), torch.float32)
        cfg = EngineConfig(max_batch_rows=max(256, jobs), max_queue=max(256, jobs), batch_wait_ms=0.0)
        engine = Engine(handle, cfg, metrics=Metrics())
        engine.start()
        reqs = [
            JobRequest(SamplingSpec(samplers[i % len(samplers)], "karras", steps, [i]), 1, {}, None, 1.0)
            for i in range(jobs)
        ]
        clock = GcClock()
        threads0 = thread_cpu()
        t0, c0 = time.perf_counter(), time.process_time()
        done = [engine.submit(r) for r in reqs]
        await asyncio.gather(*(j.wait_done() for j in done))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        threads = cpu_by_role(threads0, thread_cpu())
        clock.close()
        iterations = engine.iterations
        await engine.stop()
        assert all(j.status == JobStatus.succeeded for j in done), [j.error for j in done]
        rows = sum(j.progress.evals for j in done)
        return {
            "wall_s": wall,
            "cpu_s": cpu,
            "iterations": iterations,
            "rows": rows,
            "gc_s": clock.seconds,
            **threads,
        }

    return _LOOP.run_until_complete(go())


def fit(points: list[dict[str, float]], key: str = "ms_per_iteration") -> tuple[float, float]:
    """Least squares ``key`` = a + b * rows_per_iteration: (a ms, b us)."""
    xs = [p["rows_per_iteration"] for p in points]
    ys = [p[key] for p in points]
    n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if n > 1 and sxx else 0.0
    return my - b * mx, b * 1000.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--repeats", type=int, default=3, help="best (fastest) of this many bursts per point")
    ap.add_argument("--samplers", nargs="+", default=["euler"])
    ap.add_argument("--shape", type=int, nargs="+", default=[1, 32, 32])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--profile", type=int, default=None, help="cProfile the burst of this many jobs")
    ap.add_argument(
        "--no-freeze", action="store_true", help="skip settle_heap (the collector scans everything)"
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(args.shape)
    burst(4, 3, args.samplers, shape)  # warm-up: imports, first allocations
    if not args.no_freeze:
        settle_heap()
    points = []
    for jobs in args.jobs:
        best = min(
            (burst(jobs, args.steps, args.samplers, shape) for _ in range(args.repeats)),
            key=lambda r: r["wall_s"],
        )
        it = best["iterations"]
        point = {
            "jobs": jobs,
            **best,
            "rows_per_iteration": best["rows"] / it,
            "ms_per_iteration": 1000.0 * best["wall_s"] / it,
            "cpu_ms_per_iteration": 1000.0 * best["cpu_s"] / it,
            "iterations_per_s": it / best["wall_s"],
            "rows_per_s": best["rows"] / best["wall_s"],
        }
        points.append(point)
        ms, rows, gc_s = point["ms_per_iteration"], point["rows_per_iteration"], best["gc_s"]
        print(
            f"{jobs:4d} jobs: {ms:7.3f} ms/iteration at {rows:6.1f} rows,"
            f" {point['iterations_per_s']:7.1f} it/s, {point['rows_per_s']:8.0f} rows/s, {gc_s:.3f} s in gc,"
            f" CPU {point['cpu_ms_per_iteration']:7.3f} ms/iteration"
        )
        split = ", ".join(
            f"{k} {1e6 * best[f'{k}_cpu_s'] / best['rows']:.1f}" for k in ("worker", "loop", "other")
        )
        print(f"           CPU per row (us) by thread: {split}")
    a_ms, b_us = fit(points)
    print(f"fit: {a_ms:.3f} ms per iteration + {b_us:.1f} us per row")
    # CPU time of the whole process (every thread) per iteration: on a machine shared with other work the
    # wall clock counts time spent waiting for a core, this does not.
    cpu_a, cpu_b = fit(points, "cpu_ms_per_iteration")
    print(f"fit (CPU): {cpu_a:.3f} ms per iteration + {cpu_b:.1f} us per row")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        burst(args.profile, args.steps, args.samplers, shape)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    if args.out:
        meta = {
            "machine": platform.platform(),
            "cpu_count": torch.get_num_threads(),
            "torch": torch.__version__,
        }
        result = {"args": {k: v for k, v in vars(args).items() if k != "out"}, "meta": meta, "points": points}
        args.out.write_text(
            json.dumps(
                {
                    **result,
                    "fit": {"ms_per_iteration": a_ms, "us_per_row": b_us},
                    "fit_cpu": {"ms_per_iteration": cpu_a, "us_per_row": cpu_b},
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()

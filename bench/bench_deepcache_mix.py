"""Cached and uncached clients sharing one engine (issue 28 §3): how often a model call's rows all
hold their cache (the only calls that save work with batch-invariant rows), and what each kind of
client gets.

In-process (no HTTP): the digits model in an Engine with the service's defaults (iteration mode,
batch-invariant rows of ``--chunk``), ``--cached`` closed-loop clients asking DeepCache every
``--interval`` and ``--uncached`` clients without a cache, each sending its next request (euler,
``--steps`` steps, CFG) when the last one ends, for ``--duration`` seconds (clients start spread
over ``--stagger`` seconds, so they are at different steps). Prints the model calls
(chunks of ``--chunk`` rows), the share whose rows all held their cache, and per kind of client
requests/s and median latency.

    python bench/bench_deepcache_mix.py --cached 16 --uncached 16 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.engine import Engine, EngineConfig, JobRequest, ModelHandle  # noqa: E402
from service.models import stepcache  # noqa: E402
from service.models.stepcache import KEY, STORE, CacheSpec, cache_rows  # noqa: E402
from service.models.store import LoadedModel, ModelStore  # noqa: E402
from service.sampling.spec import SamplingSpec  # noqa: E402

MODEL_STORE = Path(__file__).resolve().parents[1] / "model_store"


def request(model: LoadedModel, seed: int, steps: int, cache: CacheSpec | None) -> JobRequest:
    cond, uncond = model.class_conditioning(torch.tensor([seed % 10]))
    cond[KEY], uncond[KEY] = cache_rows(cache, 1), cache_rows(cache, 1)
    return JobRequest(SamplingSpec("euler", "karras", steps, [seed]), 1, cond, uncond, 3.0)


async def load(model: LoadedModel, a: argparse.Namespace, group: bool) -> dict[str, Any]:
    handle = ModelHandle(
        "digits",
        model.denoiser,
        model.latent_shape,
        model.device,
        model.dtype,
        forget=stepcache.release,
        **({"cache_hits": stepcache.predicted_hit} if group else {}),
    )
    engine = Engine(
        handle, EngineConfig(batch_wait_ms=0.0, invariant_rows=a.chunk, max_batch_rows=a.max_rows)
    )
    engine.start()
    spec = CacheSpec("deepcache", interval=a.interval)
    latencies: dict[str, list[float]] = {"cached": [], "uncached": []}
    stop = time.perf_counter() + a.duration
    seeds = iter(range(10**9))

    async def client(kind: str, delay: float) -> None:
        await asyncio.sleep(delay)  # staggered starts: clients at different steps, as real ones are
        while time.perf_counter() < stop:
            t = time.perf_counter()
            job = engine.submit(request(model, next(seeds), a.steps, spec if kind == "cached" else None))
            await job.wait_done()
            if job.error is not None:
                raise RuntimeError(job.error.message)
            latencies[kind].append(time.perf_counter() - t)

    STORE.reset_counts()
    start = time.perf_counter()
    kinds = ["cached"] * a.cached + ["uncached"] * a.uncached
    order = sorted(range(len(kinds)), key=lambda i: (i * 7919) % len(kinds))  # kinds interleaved
    await asyncio.gather(*(client(kinds[i], a.stagger * k / len(kinds)) for k, i in enumerate(order)))
    wall = time.perf_counter() - start
    await engine.stop()
    out: dict[str, Any] = {"calls": STORE.calls, "all_held": STORE.all_held, "wall": wall}
    for kind, xs in latencies.items():
        out[kind] = (len(xs) / wall, statistics.median(xs) if xs else float("nan"))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    counts = {"cached": 16, "uncached": 16, "interval": 3, "steps": 20, "max-rows": 64, "threads": 2}
    for name, default in counts.items():
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument(
        "--chunk", type=int, default=8, help="batch-invariant rows per call (KDIFF_INVARIANT_ROWS)"
    )
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--stagger", type=float, default=2.0, help="seconds over which the clients start")
    p.add_argument("--rounds", type=int, default=1, help="alternate plain / grouped plans this many times")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = ModelStore(MODEL_STORE).load("digits")
    cols = [
        "plan",
        "calls",
        "all rows cached",
        "cached req/s",
        "cached p50 s",
        "uncached req/s",
        "uncached p50 s",
    ]
    print("| " + " | ".join(cols) + " |\n" + "|---" * len(cols) + "|")
    for _ in range(a.rounds):
        for group in (False, True):
            r = asyncio.run(load(model, a, group))
            cells = [
                "cached rows first" if group else "arrival order",
                r["calls"],
                f"{r['all_held'] / max(r['calls'], 1):.1%}",
                f"{r['cached'][0]:.2f}",
                f"{r['cached'][1]:.2f}",
                f"{r['uncached'][0]:.2f}",
                f"{r['uncached'][1]:.2f}",
            ]
            print("| " + " | ".join(map(str, cells)) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

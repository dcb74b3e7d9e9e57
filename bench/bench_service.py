"""Service benchmark: throughput and latency vs concurrency for the three batching modes.

Starts `kdiff serve` (one uvicorn process) per mode, drives it over loopback HTTP with a mixed
workload (samplers mixed; steps 10, 20, 50), and measures the raw denoiser rows/s at its best
batch size in-process on the same machine (the upper limit).

    python bench/bench_service.py --model-store model_store --model digits --duration 20 \
        --out docs/bench_service.json --plot docs/bench_service.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.e2e.server import Server  # noqa: E402

SAMPLERS = ["euler", "dpmpp_2m", "heun", "euler_ancestral", "dpmpp_2m_sde"]
NFE_PER_STEP = {"heun": 2}
STEPS = [10, 20, 50]


def workload(i: int) -> dict[str, Any]:
    return {
        "sampler": SAMPLERS[i % len(SAMPLERS)],
        "steps": STEPS[i % len(STEPS)],
        "seed": i,
        "class_label": i % 10,
    }


def nfe(req: dict[str, Any]) -> int:
    k = NFE_PER_STEP.get(req["sampler"], 1)
    return req["steps"] * k - (k - 1)


async def drive(url: str, concurrency: int, duration: float) -> dict[str, Any]:
    counter = iter(range(10**9))
    done: list[tuple[dict[str, Any], float]] = []
    errors = 0
    t0 = time.perf_counter()
    stop_at = t0 + duration

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            req = workload(next(counter))
            start = time.perf_counter()
            r = await http.post("/sample", json=req)
            if r.status_code == 200:
                done.append((req, time.perf_counter() - start))
            else:
                errors += 1

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    by_steps = {
        s: round(statistics.median([lat for r, lat in done if r["steps"] == s]), 3)
        for s in STEPS
        if any(r["steps"] == s for r, _ in done)
    }
    rows = sum(nfe(r) for r, _ in done)
    return {
        "concurrency": concurrency,
        "requests": len(done),
        "errors": errors,
        "elapsed_s": round(elapsed, 2),
        "images_per_s": round(len(done) / elapsed, 3),
        "rows_per_s": round(rows / elapsed, 1),
        "p50_latency_s_by_steps": by_steps,
    }


def raw_rows_per_s(store: Path, model: str, threads: int | None) -> dict[str, Any]:
    import torch

    from service.models.store import ModelStore

    if threads:
        torch.set_num_threads(threads)
    m = ModelStore(store).load(model)
    out = {}
    for b in (1, 4, 8, 16, 32, 64, 128):
        x = torch.randn(b, *m.latent_shape)
        sigma = torch.ones(b)
        cond = {"class_cond": torch.full([b], 3)} if m.conditioning == "class" else {}
        with torch.inference_mode():
            for _ in range(2):
                m.denoiser(x, sigma, **cond)
            n, t = 0, time.perf_counter()
            while time.perf_counter() - t < 2.0:
                m.denoiser(x, sigma, **cond)
                n += 1
            out[b] = round(b * n / (time.perf_counter() - t), 1)
    best = max(out, key=lambda k: out[k])
    return {"rows_per_s_by_batch": out, "best_batch": best, "best_rows_per_s": out[best]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-store", default="model_store")
    p.add_argument("--model", default="digits")
    p.add_argument("--modes", nargs="+", default=["iteration", "request", "serial"])
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per point")
    p.add_argument("--max-batch-rows", default="64")
    p.add_argument("--threads", type=int, default=None, help="torch threads (server and raw)")
    p.add_argument("--out", default="docs/bench_service.json")
    p.add_argument("--plot", default="docs/bench_service.png")
    a = p.parse_args()
    store = Path(a.model_store).resolve()
    env = {
        "KDIFF_MODELS": a.model,
        "KDIFF_MAX_BATCH_ROWS": a.max_batch_rows,
        "KDIFF_BATCH_WAIT_MS": "2",
        "KDIFF_MAX_QUEUE": "1024",
    }
    results: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "model": a.model,
        "duration_s": a.duration,
        "modes": {},
    }
    results["raw"] = raw_rows_per_s(store, a.model, a.threads)
    print("raw", results["raw"], flush=True)
    for mode in a.modes:
        extra = {"KDIFF_BATCHING": mode}
        if a.threads:
            extra["KDIFF_TORCH_THREADS"] = str(a.threads)
        srv = Server(store, Path(f"/tmp/bench-{mode}.log"), **env, **extra)
        try:
            srv.wait_ready(120)
            asyncio.run(drive(srv.url, 2, 3.0))  # warm-up
            points = []
            for c in a.concurrency:
                point = asyncio.run(drive(srv.url, c, a.duration))
                print(mode, point, flush=True)
                points.append(point)
            results["modes"][mode] = points
        finally:
            srv.stop()
    Path(a.out).write_text(json.dumps(results, indent=2))
    plot(results, a.plot)
    return 0


def plot(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, points in results["modes"].items():
        ax.plot([p["concurrency"] for p in points], [p["rows_per_s"] for p in points], marker="o", label=mode)
    ax.axhline(results["raw"]["best_rows_per_s"], ls="--", c="gray", label="raw denoiser (best batch)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("denoiser rows / s (NFE x images)")
    ax.set_title(f"{results['model']}: throughput vs concurrency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())

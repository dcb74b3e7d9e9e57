"""Ray Serve benchmark: 1 vs 2 engine replicas, and the Ray path vs `kdiff serve` (ratio in one run).

Starts a local Ray cluster (2 logical CPUs, no dashboard) and, beside it, one `kdiff serve` process;
every engine runs with 1 torch thread (KDIFF_TORCH_THREADS=1), as does `kdiff serve`. Mixed workload
on the digits model (samplers mixed, 20 steps, n=1, POST /sample over loopback HTTP). Measurements of
the Ray path and of `kdiff serve` alternate (``--rounds``), so machine load hits both alike.

    python bench/bench_ray.py --model-store model_store --requests 64 --rounds 2 --out docs/bench_ray.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.server import Server, free_port  # noqa: E402

SAMPLERS = ["euler", "dpmpp_2m", "heun", "euler_ancestral", "dpmpp_2m_sde"]
SETTINGS = {"torch_threads": 1, "batch_wait_ms": 0}


def body(i: int) -> dict[str, Any]:
    return {"sampler": SAMPLERS[i % len(SAMPLERS)], "steps": 20, "seed": i, "class_label": i % 10}


async def drive(url: str, n: int, concurrency: int) -> dict[str, Any]:
    sem = asyncio.Semaphore(concurrency)
    engines: dict[str, int] = {}
    latencies: list[float] = []

    async def one(c: httpx.AsyncClient, i: int) -> None:
        async with sem:
            t = time.perf_counter()
            r = await c.post("/sample", json=body(i))
            latencies.append(time.perf_counter() - t)
            r.raise_for_status()
            e = r.headers.get("x-kdiff-engine", "single").split(";")[0]
            engines[e] = engines.get(e, 0) + 1

    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        await asyncio.gather(*(one(c, i) for i in range(concurrency)))  # warm-up
        engines.clear()
        latencies.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*(one(c, i) for i in range(n)))
        wall = time.perf_counter() - t0
    return {
        "requests": n,
        "concurrency": concurrency,
        "wall_s": round(wall, 3),
        "req_per_s": round(n / wall, 3),
        "p50_s": round(statistics.median(latencies), 3),
        "by_engine": engines,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-store", default="model_store")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import ray
    from ray import serve

    from service.deploy.ray_serve import APP_NAME, build_app

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    store = str(Path(args.model_store).resolve())
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 << 20, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    ray_url = f"http://127.0.0.1:{port}"

    def deploy(engines: int) -> None:
        app_args = {"engines": engines, "engine_cpus": 1, "settings": {**SETTINGS, "model_store": store}}
        serve.run(build_app(app_args), name=APP_NAME, route_prefix="/")

    single = Server(Path(store), Path(tempfile.mkdtemp()) / "serve.log", KDIFF_MODELS="digits")
    single.wait_ready(120)
    results: dict[str, Any] = {"overhead_c8": [], "engines": {"1": [], "2": []}}
    try:
        deploy(1)
        for _ in range(args.rounds):  # alternate: Ray (1 engine) vs kdiff serve, concurrency 8
            r = asyncio.run(drive(ray_url, args.requests, 8))
            s = asyncio.run(drive(single.url, args.requests, 8))
            results["overhead_c8"].append({"ray_1_engine": r, "kdiff_serve": s})
            print(f"c=8  ray(1 engine) {r['req_per_s']:.2f} req/s   kdiff serve {s['req_per_s']:.2f} req/s")
        single.stop()  # idle, but out of the way for the engine comparison
        for i in range(args.rounds):  # 1 vs 2 engines, alternating deployments, concurrency 16
            for engines in (1, 2):
                if i or engines == 2:
                    deploy(engines)
                e = asyncio.run(drive(ray_url, args.requests, 16))
                results["engines"][str(engines)].append(e)
                print(f"c=16 {engines} engine(s) {e['req_per_s']:.2f} req/s", e["by_engine"])
    finally:
        single.stop()
        serve.shutdown()
        ray.shutdown()
    ray_rps = statistics.median(x["ray_1_engine"]["req_per_s"] for x in results["overhead_c8"])
    one_rps = statistics.median(x["kdiff_serve"]["req_per_s"] for x in results["overhead_c8"])
    results["ray_over_kdiff_serve_time_ratio_c8"] = round(one_rps / ray_rps, 3)
    e1 = statistics.median(e["req_per_s"] for e in results["engines"]["1"])
    e2 = statistics.median(e["req_per_s"] for e in results["engines"]["2"])
    results["speedup_2_engines_c16"] = round(e2 / e1, 3)
    results["machine"] = {
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    print(f"time ratio Ray/kdiff serve at c=8: {results['ray_over_kdiff_serve_time_ratio_c8']}")
    print(f"2 vs 1 engine speed-up at c=16: {results['speedup_2_engines_c16']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Issue 28 §5 experiment: how much of the Ray path is Serve's HTTP proxy and ingress replica.

Beside the served topology (Serve's proxy -> Ingress replica -> engine replica) and `kdiff serve`, a
third entry point forwards requests to the same engine replica from outside Serve: a plain uvicorn
process that is a Ray driver and calls the engine's deployment handle, as the Ingress replica does
(the same request dict, the same streamed answer). It keeps none of the Ingress's routing, resend or
error mapping: it measures the cost an ingress outside Serve would start from, not a served topology.

    python bench/bench_ray_ingress.py --rounds 3 [--requests 64]

Each round drives 64 `POST /sample` requests (bench_ray's workload) at concurrency 8 through each of
the three, then 256 `GET /samplers` (the path alone), and prints the time ratios against `kdiff serve`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_ray import SETTINGS, cluster_procs, drive, serve_procs  # noqa: E402
from tests.support.server import Server, free_port  # noqa: E402

HOP_BY_HOP = {"content-length", "transfer-encoding", "connection"}


def forwarder(port: int, app_name: str) -> None:
    """The outside ingress (runs in its own process: ``--forwarder``): every request to engine0."""
    import ray
    import uvicorn
    from ray import serve
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    ray.init(address=os.environ["KDIFF_BENCH_RAY_ADDRESS"], namespace="serve", log_to_driver=False)
    engine = serve.get_deployment_handle("engine0", app_name=app_name).options(stream=True)

    async def forward(request: Request) -> Response:
        req = {
            "method": request.method,
            "path": request.url.path,
            "query": request.url.query,
            "headers": [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw],
            "body": await request.body(),
            "client": None,
            "scheme": "http",
        }
        gen = engine.http.remote(req)
        first = await gen.__anext__()
        chunks = [first["body"]] + ([c async for c in gen] if first["more"] else [])
        data = b"".join(chunks)
        response = Response(data, status_code=first["status"])
        response.raw_headers = [
            (k.lower().encode(), v.encode()) for k, v in first["headers"] if k.lower() not in HOP_BY_HOP
        ]
        response.headers["content-length"] = str(len(data))
        return response

    app = Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def wait_up(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/samplers", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--model-store", default="model_store")
    ap.add_argument("--forwarder", nargs=2, metavar=("PORT", "APP"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.forwarder:
        forwarder(int(a.forwarder[0]), a.forwarder[1])
        return 0
    import ray
    from ray import serve

    from service.deploy.ray_serve import APP_NAME, build_app

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_worker_niceness", "0")  # as bench_ray: the replicas at kdiff serve's nice
    store = str(Path(a.model_store).resolve())
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 << 20, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    app_args = {
        "engines": 1,
        "engine_cpus": 1,
        "log_level": "WARNING",
        "settings": {**SETTINGS, "model_store": store},
    }
    serve.run(build_app(app_args), name=APP_NAME, route_prefix="/")
    single = Server(Path(store), Path(tempfile.mkdtemp()) / "serve.log", KDIFF_MODELS="digits")
    out_port = free_port()
    env = {**os.environ, "KDIFF_BENCH_RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    outside = subprocess.Popen(
        [sys.executable, __file__, "--forwarder", str(out_port), APP_NAME],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    urls = {"serve proxy": f"http://127.0.0.1:{port}", "outside": f"http://127.0.0.1:{out_port}"}
    ratios: dict[str, list[float]] = {k: [] for k in urls}
    try:
        single.wait_ready(120)
        wait_up(urls["outside"])
        on_ray, on_single = cluster_procs(single.proc.pid), serve_procs(single.proc.pid)
        for r in range(a.rounds):
            res: dict[str, Any] = {k: asyncio.run(drive(u, a.requests, 8, on_ray)) for k, u in urls.items()}
            res["kdiff serve"] = asyncio.run(drive(single.url, a.requests, 8, on_single))
            path = {k: asyncio.run(drive(u, 4 * a.requests, 8, on_ray, light=True)) for k, u in urls.items()}
            path["kdiff serve"] = asyncio.run(drive(single.url, 4 * a.requests, 8, on_single, light=True))
            base = res["kdiff serve"]["req_per_s"]
            for k in urls:
                ratios[k].append(base / res[k]["req_per_s"])
            print(
                f"round {r}: req/s "
                + ", ".join(f"{k} {v['req_per_s']:.2f}" for k, v in res.items())
                + " | time ratio vs kdiff serve: "
                + ", ".join(f"{k} {ratios[k][-1]:.3f}" for k in urls)
                + " | path alone p50 ms: "
                + ", ".join(f"{k} {v['p50_s'] * 1000:.0f}" for k, v in path.items()),
                flush=True,
            )
    finally:
        outside.kill()
        single.stop()
        serve.shutdown()
        ray.shutdown()
    print("median time ratio vs kdiff serve:", {k: round(statistics.median(v), 3) for k, v in ratios.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Ray Serve benchmark: 1 vs 2 engine replicas, and the Ray path vs `kdiff serve` (ratio in one run).

Starts a local Ray cluster (2 logical CPUs, no dashboard) and, beside it, one `kdiff serve` process;
every engine runs with 1 torch thread (KDIFF_TORCH_THREADS=1), as does `kdiff serve`. Mixed workload
on the digits model (samplers mixed, 20 steps, n=1, POST /sample over loopback HTTP). Measurements of
the Ray path and of `kdiff serve` alternate (``--rounds``), so machine load hits both alike. Each
measurement also counts the CPU time (user + system) its server side spent per request: every process
of the Ray cluster (raylet, GCS, Serve's controller and proxy, the replicas; psutil over this
process's descendants) vs the `kdiff serve` process; on a shared machine that is the steadier figure.

    python bench/bench_ray.py --model-store model_store --requests 64 --rounds 2 --out docs/bench_ray.json

Old tree vs new tree, interleaved (compare_trees.py style: each round runs this script once per tree,
each tree's own `service` package first on PYTHONPATH, which Ray's workers inherit):

    git worktree add /tmp/old <commit>
    python bench/bench_ray.py --old /tmp/old --rounds 3 --out docs/bench_ray_trees.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.server import Server, free_port  # noqa: E402

SAMPLERS = ["euler", "dpmpp_2m", "heun", "euler_ancestral", "dpmpp_2m_sde"]
SETTINGS = {"torch_threads": 1, "batch_wait_ms": 0}


def body(i: int) -> dict[str, Any]:
    return {"sampler": SAMPLERS[i % len(SAMPLERS)], "steps": 20, "seed": i, "class_label": i % 10}


def kind(p: psutil.Process) -> str:
    """What a process of the cluster is, for the CPU breakdown (Ray names its workers ``ray::<actor>``)."""
    try:
        name = " ".join(p.cmdline())[:200] or p.name()
    except psutil.Error:
        return "gone"
    for key, label in (
        ("ServeReplica", "replicas"),
        ("ProxyActor", "serve proxy"),
        ("ServeController", "serve controller"),
        ("raylet", "raylet"),
        ("gcs_server", "gcs"),
    ):
        if key in name:
            return label
    return "other ray"


def cpu_times(procs: list[psutil.Process]) -> dict[int, tuple[str, float]]:
    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = (kind(p), t.user + t.system)
        except psutil.Error:
            pass
    return out


def cpu_spent(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per kind of process between two snapshots (a process new in ``after``: all of it)."""
    spent: dict[str, float] = {}
    for pid, (what, t) in after.items():
        spent[what] = spent.get(what, 0.0) + t - before.get(pid, (what, 0.0))[1]
    return spent


async def drive(
    url: str, n: int, concurrency: int, procs: Callable[[], list[psutil.Process]], light: bool = False
) -> dict[str, Any]:
    """``n`` requests, ``concurrency`` at a time, after a warm-up: POST /sample (the workload), or with
    ``light`` GET /samplers (the path alone: the guard and a route, no model call)."""
    sem = asyncio.Semaphore(concurrency)
    engines: dict[str, int] = {}
    latencies: list[float] = []

    async def one(c: httpx.AsyncClient, i: int) -> None:
        async with sem:
            t = time.perf_counter()
            r = await (c.get("/samplers") if light else c.post("/sample", json=body(i)))
            latencies.append(time.perf_counter() - t)
            r.raise_for_status()
            e = r.headers.get("x-kdiff-engine", "single").split(";")[0]
            e += " via ingress" if "x-kdiff-ingress" in r.headers else ""  # the old topology's hop
            engines[e] = engines.get(e, 0) + 1

    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        await asyncio.gather(*(one(c, i) for i in range(concurrency)))  # warm-up
        engines.clear()
        latencies.clear()
        watched = procs()
        cpu0 = cpu_times(watched)
        t0 = time.perf_counter()
        await asyncio.gather(*(one(c, i) for i in range(n)))
        wall = time.perf_counter() - t0
        spent = cpu_spent(cpu0, cpu_times(watched + [p for p in procs() if p.pid not in cpu0]))
    return {
        "requests": n,
        "concurrency": concurrency,
        "wall_s": round(wall, 3),
        "req_per_s": round(n / wall, 3),
        "p50_s": round(statistics.median(latencies), 3),
        "cpu_ms_per_request": round(1000 * sum(spent.values()) / n, 1),
        "cpu_ms_per_request_by_process": {k: round(1000 * v / n, 1) for k, v in sorted(spent.items())},
        "by_engine": engines,
    }


def cluster_procs(exclude: int) -> Callable[[], list[psutil.Process]]:
    """The processes of the local Ray cluster: this process's descendants but ``exclude``'s tree."""

    def procs() -> list[psutil.Process]:
        try:
            skip = {exclude} | {c.pid for c in psutil.Process(exclude).children(recursive=True)}
        except psutil.NoSuchProcess:  # `kdiff serve` stopped (the engine comparison)
            skip = {exclude}
        return [p for p in psutil.Process().children(recursive=True) if p.pid not in skip]

    return procs


def serve_procs(pid: int) -> Callable[[], list[psutil.Process]]:
    return lambda: [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """This tree's Ray path vs `kdiff serve` (and, unless --skip-engines, 1 vs 2 engines)."""
    if args.tree:  # only the tree under test (Ray's workers get this process's sys.path, and PYTHONPATH)
        here = Path(__file__).resolve().parents[1]
        sys.path[:] = [str(Path(args.tree).resolve())] + [
            p for p in sys.path if Path(p or ".").resolve() != here
        ]
    import ray
    from ray import serve

    from service.deploy.ray_serve import APP_NAME, build_app

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray starts its workers (the replicas) at nice 15: on a shared machine they would yield to
    # `kdiff serve` (nice 0) and the ratio would measure the scheduler, not the path
    os.environ.setdefault("RAY_worker_niceness", "0")
    store = str(Path(args.model_store).resolve())
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 << 20, log_to_driver=False)
    port, direct = free_port(), free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    proxy_url, direct_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{direct}"

    def deploy(engines: int) -> None:
        app_args: dict[str, Any] = {
            "engines": engines,
            "engine_cpus": 1,
            "settings": {**SETTINGS, "model_store": store},
            # the ingress replicas' own listener (a tree before it ignores this: Serve's proxy only)
            "http_port": direct,
            "http_host": "127.0.0.1",
        }
        if not args.tree:  # as `kdiff serve --log-level warning` (tests/support/server.py); old vs new
            app_args["log_level"] = "WARNING"  # trees both log at Serve's INFO (the old one has no choice)
        serve.run(build_app(app_args), name=APP_NAME, route_prefix="/")

    single = Server(Path(store), Path(tempfile.mkdtemp()) / "serve.log", KDIFF_MODELS="digits")
    single.wait_ready(120)
    on_ray, on_single = cluster_procs(single.proc.pid), serve_procs(single.proc.pid)
    results: dict[str, Any] = {"overhead_c8": [], "engines": {"1": [], "2": []}}
    try:
        deploy(1)
        # the Ray path users get: the ingress's own listener where the tree has one, else Serve's proxy
        ray_url = direct_url if answers(direct_url) else proxy_url
        results["ray_entry"] = "ingress listener" if ray_url == direct_url else "serve proxy"
        print(f"Ray path: {results['ray_entry']}", flush=True)
        for _ in range(args.rounds):  # alternate: Ray (1 engine) vs kdiff serve, concurrency 8
            r = asyncio.run(drive(ray_url, args.requests, 8, on_ray))
            s = asyncio.run(drive(single.url, args.requests, 8, on_single))
            pair = {"ray_1_engine": r, "kdiff_serve": s}
            if ray_url != proxy_url:  # the same replicas through Serve's proxy, for comparison
                pair["ray_1_engine_serve_proxy"] = asyncio.run(drive(proxy_url, args.requests, 8, on_ray))
            results["overhead_c8"].append(pair)
            lr = asyncio.run(drive(ray_url, 4 * args.requests, 8, on_ray, light=True))
            ls = asyncio.run(drive(single.url, 4 * args.requests, 8, on_single, light=True))
            results.setdefault("path_only_c8", []).append({"ray_1_engine": lr, "kdiff_serve": ls})
            print(
                f"c=8  GET /samplers: Ray {lr['cpu_ms_per_request']} CPU ms/req, {lr['p50_s'] * 1000:.1f} ms "
                f"p50   kdiff serve {ls['cpu_ms_per_request']} CPU ms/req, {ls['p50_s'] * 1000:.1f} ms p50",
                flush=True,
            )
            via = pair.get("ray_1_engine_serve_proxy")
            print(
                f"c=8  ray(1 engine) {r['req_per_s']:.2f} req/s {r['cpu_ms_per_request']} CPU ms/req   "
                f"kdiff serve {s['req_per_s']:.2f} req/s {s['cpu_ms_per_request']} CPU ms/req"
                + (f"   via Serve's proxy {via['req_per_s']:.2f} req/s" if via else ""),
                flush=True,
            )
        single.stop()  # idle, but out of the way for the engine comparison
        for i in range(0 if args.skip_engines else args.rounds):  # 1 vs 2 engines, concurrency 16
            for engines in (1, 2):
                if i or engines == 2:
                    deploy(engines)
                e = asyncio.run(drive(ray_url, args.requests, 16, on_ray))
                results["engines"][str(engines)].append(e)
                print(f"c=16 {engines} engine(s) {e['req_per_s']:.2f} req/s", e["by_engine"], flush=True)
    finally:
        single.stop()
        serve.shutdown()
        ray.shutdown()
    pairs = results["overhead_c8"]
    ray_rps = statistics.median(x["ray_1_engine"]["req_per_s"] for x in pairs)
    one_rps = statistics.median(x["kdiff_serve"]["req_per_s"] for x in pairs)
    results["ray_over_kdiff_serve_time_ratio_c8"] = round(one_rps / ray_rps, 3)
    if all("ray_1_engine_serve_proxy" in x for x in pairs):
        via_proxy = statistics.median(x["ray_1_engine_serve_proxy"]["req_per_s"] for x in pairs)
        results["serve_proxy_over_kdiff_serve_time_ratio_c8"] = round(one_rps / via_proxy, 3)
    results["cpu_ms_per_request_c8"] = {
        "ray": statistics.median(x["ray_1_engine"]["cpu_ms_per_request"] for x in pairs),
        "kdiff_serve": statistics.median(x["kdiff_serve"]["cpu_ms_per_request"] for x in pairs),
    }
    light = results["path_only_c8"]
    results["path_only_cpu_ms_per_request_c8"] = {
        "ray": statistics.median(x["ray_1_engine"]["cpu_ms_per_request"] for x in light),
        "kdiff_serve": statistics.median(x["kdiff_serve"]["cpu_ms_per_request"] for x in light),
    }
    if not args.skip_engines:
        e1 = statistics.median(e["req_per_s"] for e in results["engines"]["1"])
        e2 = statistics.median(e["req_per_s"] for e in results["engines"]["2"])
        results["speedup_2_engines_c16"] = round(e2 / e1, 3)
    results["machine"] = machine()
    print(f"time ratio Ray/kdiff serve at c=8: {results['ray_over_kdiff_serve_time_ratio_c8']}")
    if "serve_proxy_over_kdiff_serve_time_ratio_c8" in results:
        print(f"  the same via Serve's proxy: {results['serve_proxy_over_kdiff_serve_time_ratio_c8']}")
    print(f"CPU ms per request at c=8: {results['cpu_ms_per_request_c8']}")
    if not args.skip_engines:
        print(f"2 vs 1 engine speed-up at c=16: {results['speedup_2_engines_c16']}")
    return results


def answers(url: str, timeout_s: float = 15) -> bool:
    """Whether ``url`` serves GET /samplers within ``timeout_s`` (a listener the tree may not have)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/samplers", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Each round: this script on the old tree, then on this one (one Ray cluster each, in turn)."""
    trees = {"old": Path(args.old).resolve(), "new": Path(__file__).resolve().parents[1]}
    rounds: list[dict[str, Any]] = []
    for i in range(args.rounds):
        row: dict[str, Any] = {}
        for name, tree in trees.items():
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "out.json"
                cmd = [sys.executable, __file__, "--tree", str(tree), "--rounds", "1", "--skip-engines"]
                cmd += [
                    "--model-store",
                    args.model_store,
                    "--requests",
                    str(args.requests),
                    "--out",
                    str(out),
                ]
                env = {**os.environ, "PYTHONPATH": str(tree)}
                with open(Path(tmp) / "log", "wb") as log:  # cwd: the tree (Ray's workers may see it)
                    done = subprocess.run(cmd, env=env, cwd=tree, stdout=log, stderr=subprocess.STDOUT)
                if done.returncode:
                    raise SystemExit(f"{name} tree failed:\n{(Path(tmp) / 'log').read_text()[-3000:]}")
                data = json.loads(out.read_text())
            pair = data["overhead_c8"][0]
            row[name] = {
                **pair,
                "time_ratio": data["ray_over_kdiff_serve_time_ratio_c8"],
                "ray_entry": data.get("ray_entry", "serve proxy"),
                "path_only": data["path_only_c8"][0],
            }
            print(
                f"round {i + 1} {name}: ratio {row[name]['time_ratio']}  CPU ms/req Ray "
                f"{pair['ray_1_engine']['cpu_ms_per_request']} vs kdiff serve "
                f"{pair['kdiff_serve']['cpu_ms_per_request']}",
                flush=True,
            )
        rounds.append(row)
    summary = {
        name: {
            "time_ratio_median": statistics.median(r[name]["time_ratio"] for r in rounds),
            "ray_cpu_ms_per_request_median": statistics.median(
                r[name]["ray_1_engine"]["cpu_ms_per_request"] for r in rounds
            ),
            "kdiff_serve_cpu_ms_per_request_median": statistics.median(
                r[name]["kdiff_serve"]["cpu_ms_per_request"] for r in rounds
            ),
            "path_only_ray_cpu_ms_per_request_median": statistics.median(
                r[name]["path_only"]["ray_1_engine"]["cpu_ms_per_request"] for r in rounds
            ),
            "path_only_kdiff_serve_cpu_ms_per_request_median": statistics.median(
                r[name]["path_only"]["kdiff_serve"]["cpu_ms_per_request"] for r in rounds
            ),
        }
        for name in trees
    }
    print(json.dumps(summary, indent=2))
    return {
        "trees": {k: str(v) for k, v in trees.items()},
        "rounds": rounds,
        "summary": summary,
        "machine": machine(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-store", default="model_store")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-engines", action="store_true", help="only the Ray vs kdiff serve rounds")
    ap.add_argument("--old", help="an old tree to interleave with this one (see the module's doc)")
    ap.add_argument("--tree", help=argparse.SUPPRESS)  # compare()'s child runs: the tree under test
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    results = compare(args) if args.old else measure(args)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

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
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.server import Server  # noqa: E402

SAMPLERS = ["euler", "dpmpp_2m", "heun", "euler_ancestral", "dpmpp_2m_sde"]
NFE_PER_STEP = {"heun": 2}
STEPS = [10, 20, 50]


def workload(i: int, n: int = 1) -> dict[str, Any]:
    req = {
        "sampler": SAMPLERS[i % len(SAMPLERS)],
        "steps": STEPS[i % len(STEPS)],
        "seed": i,
        "class_label": i % 10,
    }
    return req if n == 1 else {**req, "n": n}


def nfe(req: dict[str, Any]) -> int:
    """Rows the request costs the model: evaluations x images."""
    k = NFE_PER_STEP.get(req["sampler"], 1)
    return (req["steps"] * k - (k - 1)) * req.get("n", 1)


def scrape(url: str) -> dict[str, float]:
    """Server-side counters from /metrics: rows evaluated, model calls and their seconds, running jobs."""
    text = httpx.get(url + "/metrics", timeout=10).text
    want = {
        "kdiff_nfe_total": "rows",
        "kdiff_batch_rows_count": "calls",
        "kdiff_model_call_seconds_sum": "call_s",
        "kdiff_running_jobs": "running",
        "kdiff_network_call_rows_sum": "net_rows",  # the network's calls as run (chunks / wide calls)
        "kdiff_network_call_rows_count": "net_calls",
    }
    out = dict.fromkeys(want.values(), 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name in want and not line.startswith("#"):
            out[want[name]] += float(line.rsplit(" ", 1)[1])
    out["t"] = time.perf_counter()
    return out


def threads(pid: int) -> dict[int, tuple[float, int]]:
    """Each thread of ``pid``: (CPU seconds, voluntary context switches), from Linux's /proc."""
    out: dict[int, tuple[float, int]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:  # the thread ended
            continue
        sleeps = next(
            int(line.split()[1]) for line in status.splitlines() if line.startswith("voluntary_ctxt")
        )
        out[int(tid)] = ((int(fields[11]) + int(fields[12])) / tick, sleeps)
    return out


def thread_use(
    a: dict[int, tuple[float, int]], b: dict[int, tuple[float, int]], seconds: float
) -> dict[str, Any]:
    """Cores used and sleeps/s per thread between two snapshots, busiest first. An OpenMP worker that
    sleeps thousands of times a second is being throttled (service/engine/omp_teams.py)."""
    use = [
        ((cpu - a.get(tid, (0.0, 0))[0]) / seconds, (sleeps - a.get(tid, (0.0, 0))[1]) / seconds)
        for tid, (cpu, sleeps) in b.items()
    ]
    use.sort(reverse=True)
    return {
        "cores": round(sum(c for c, _ in use), 3),
        "busiest_threads": [{"cores": round(c, 3), "sleeps_per_s": round(z)} for c, z in use[:3]],
    }


async def run_sample(http: httpx.AsyncClient, req: dict[str, Any]) -> bool:
    return (await http.post("/sample", json=req)).status_code == 200


async def run_job(http: httpx.AsyncClient, req: dict[str, Any]) -> bool:
    """POST /jobs, then its event stream up to the end (the result stays stored, as a client's would)."""
    r = await http.post("/jobs", json=req)
    if r.status_code != 202:
        return False
    async with http.stream("GET", f"/jobs/{r.json()['id']}/events") as events:
        async for line in events.aiter_lines():
            if line.startswith("event: ") and line[7:] in ("done", "error", "cancelled"):
                return line[7:] == "done"
    return False


async def drive(
    url: str,
    concurrency: int,
    duration: float,
    ramp: float = 3.0,
    route: str = "sample",
    n: int = 1,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """Closed-loop clients; counts the requests that finish inside a window of ``duration`` seconds
    that opens ``ramp`` seconds after the clients start (steady state: no start-up burst, and no
    tail in which the last requests run with fewer clients). Clients are stopped when it closes."""
    counter = iter(range(10**9))
    done: list[tuple[dict[str, Any], float]] = []
    errors = 0
    t0 = time.perf_counter()
    opens, closes = t0 + ramp, t0 + ramp + duration
    windows: dict[str, dict[str, float]] = {}
    procs: dict[str, tuple[dict[int, tuple[float, int]], dict[int, tuple[float, int]]]] = {}

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        while True:
            req = workload(next(counter), n)
            start = time.perf_counter()
            ok = await (run_job(http, req) if route == "jobs" else run_sample(http, req))
            end = time.perf_counter()
            if opens <= end <= closes:
                if ok:
                    done.append((req, end - start))
                else:
                    errors += 1

    async def window() -> None:
        await asyncio.sleep(opens - time.perf_counter())
        windows["open"] = await asyncio.to_thread(scrape, url)
        procs["open"] = (threads(server_pid) if server_pid else {}, threads(os.getpid()))
        await asyncio.sleep(closes - time.perf_counter())
        windows["close"] = await asyncio.to_thread(scrape, url)
        procs["close"] = (threads(server_pid) if server_pid else {}, threads(os.getpid()))

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        clients = [asyncio.create_task(client(http)) for _ in range(concurrency)]
        await window()
        for task in clients:
            task.cancel()  # the server sees the disconnects and cancels those jobs
        await asyncio.gather(*clients, return_exceptions=True)
    settle_by = time.perf_counter() + 120
    while (await asyncio.to_thread(scrape, url))["running"] > 0:  # let the cancelled jobs leave
        if time.perf_counter() > settle_by:
            raise RuntimeError("jobs of disconnected clients still running after 120 s (an engine bug)")
        await asyncio.sleep(0.2)
    a, b = windows["open"], windows["close"]
    elapsed = b["t"] - a["t"]
    by_steps = {
        s: round(statistics.median([lat for r, lat in done if r["steps"] == s]), 3)
        for s in STEPS
        if any(r["steps"] == s for r, _ in done)
    }
    rows = sum(nfe(r) for r, _ in done)
    calls = b["calls"] - a["calls"]
    cpu = {
        "server": thread_use(procs["open"][0], procs["close"][0], elapsed),
        "client": thread_use(procs["open"][1], procs["close"][1], elapsed)["cores"],
    }
    return {
        "concurrency": concurrency,
        "requests": len(done),
        "errors": errors,
        "elapsed_s": round(elapsed, 2),
        "images_per_s": round(sum(r.get("n", 1) for r, _ in done) / elapsed, 3),
        "rows_per_s": round(rows / elapsed, 1),
        "p50_latency_s_by_steps": by_steps,
        "server_rows_per_s": round((b["rows"] - a["rows"]) / elapsed, 1),
        "rows_per_call": round((b["rows"] - a["rows"]) / max(calls, 1), 1),
        "model_busy": round((b["call_s"] - a["call_s"]) / elapsed, 3),
        "network_rows_per_call": round(
            (b["net_rows"] - a["net_rows"]) / max(b["net_calls"] - a["net_calls"], 1), 1
        ),
        "cpu": cpu,  # where the cores went: the server's threads, this process's (the clients)
    }


class RawDenoiser:
    """The denoiser alone, in this process, built as the server builds it (traced unless --no-jit)."""

    def __init__(self, store: Path, model: str, threads: int | None, jit: bool) -> None:
        import torch

        from service.models.store import ModelStore
        from service.models.traced import trace_denoiser

        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()  # the server gets the same (KDIFF_TORCH_THREADS)
        self.model = ModelStore(store).load(model)
        if jit:
            trace_denoiser(self.model.denoiser)

    def measure(self, batches: tuple[int, ...], rounds: int, seconds: float) -> dict[str, Any]:
        """Rows/s per batch size, median over ``rounds`` (interleaved, so drifts hit all sizes alike)."""
        import torch

        m = self.model
        runs: dict[int, list[float]] = {b: [] for b in batches}
        with torch.inference_mode():
            for _ in range(rounds):
                for b in batches:
                    x, sigma = torch.randn(b, *m.latent_shape), torch.ones(b)
                    cond = {"class_cond": torch.full([b], 3)} if m.conditioning == "class" else {}
                    for _ in range(2):
                        m.denoiser(x, sigma, **cond)
                    n, t = 0, time.perf_counter()
                    while time.perf_counter() - t < seconds:
                        m.denoiser(x, sigma, **cond)
                        n += 1
                    runs[b].append(b * n / (time.perf_counter() - t))
        out = {b: round(statistics.median(r), 1) for b, r in runs.items()}
        best = max(out, key=lambda k: out[k])
        return {"rows_per_s_by_batch": out, "best_batch": best, "best_rows_per_s": out[best]}

    def bracket(self, run: Any) -> tuple[Any, dict[int, float]]:
        """Run ``run()`` between two short raw measurements: rows/s per batch size (8 to 128), the mean
        of the two (the limit is the best of them). This box drifts by tens of percent over minutes, so the
        limit is taken around each point rather than once per run."""
        sizes = (8, 16, 32, 64, 128)
        before = self.measure(sizes, 1, 1.0)["rows_per_s_by_batch"]
        result = run()
        after = self.measure(sizes, 1, 1.0)["rows_per_s_by_batch"]
        return result, {b: round((before[b] + after[b]) / 2, 1) for b in sizes}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-store", default="model_store")
    p.add_argument("--model", default="digits")
    p.add_argument("--modes", nargs="+", default=["iteration", "request", "serial"])
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per point")
    p.add_argument("--max-batch-rows", default="64")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (server and raw); default torch's (cores)"
    )
    p.add_argument("--no-jit", action="store_true", help="serve and measure the eager model (KDIFF_JIT=0)")
    p.add_argument(
        "--route", choices=["sample", "jobs"], default="sample", help="POST /sample, or /jobs + SSE"
    )
    p.add_argument(
        "--state-dir",
        default="",
        help="KDIFF_STATE_DIR of the server (a fresh folder per mode); empty: in memory",
    )
    p.add_argument("--n", type=int, default=1, help="images per request (batches grow past the clients)")
    p.add_argument(
        "--invariant-rows",
        type=int,
        default=8,
        help="KDIFF_INVARIANT_ROWS of the server (its default 8: each engine call runs as model calls of"
        " exactly this many rows, padded); 0: calls of any size",
    )
    p.add_argument("--out", default="docs/bench_service.json")
    p.add_argument("--plot", default="docs/bench_service.png")
    a = p.parse_args()
    store = Path(a.model_store).resolve()
    env = {
        "KDIFF_MODELS": a.model,
        "KDIFF_MAX_BATCH_ROWS": a.max_batch_rows,
        "KDIFF_BATCH_WAIT_MS": "2",
        "KDIFF_MAX_QUEUE": "1024",
        "KDIFF_JIT": "false" if a.no_jit else "true",
        "KDIFF_INVARIANT_ROWS": str(a.invariant_rows),
    }
    results: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "model": a.model,
        "duration_s": a.duration,
        "jit": not a.no_jit,
        "route": a.route,
        "images_per_request": a.n,
        "invariant_rows": a.invariant_rows,
        "state_dir": bool(a.state_dir),
        "modes": {},
    }
    raw = RawDenoiser(store, a.model, a.threads, not a.no_jit)
    results["raw"] = raw.measure((1, 4, 8, 16, 32, 64, 128), 3, 1.5)
    print("raw", results["raw"], flush=True)
    for mode in a.modes:
        extra = {"KDIFF_BATCHING": mode}
        if a.state_dir:
            state = Path(a.state_dir) / mode
            shutil.rmtree(state, ignore_errors=True)
            extra["KDIFF_STATE_DIR"] = str(state)
        # the same torch threads as the raw loop: tests/support/server.py would otherwise start the
        # server with one, which measured the service at one thread against raw at two (before 2026-12-07)
        extra["KDIFF_TORCH_THREADS"] = str(raw.threads)
        srv = Server(store, Path(f"/tmp/bench-{mode}.log"), **env, **extra)
        try:
            srv.wait_ready(120)
            asyncio.run(drive(srv.url, 2, 3.0))  # warm-up
            points = []
            for c in a.concurrency:
                point, by_batch = raw.bracket(
                    lambda c=c, url=srv.url, pid=srv.proc.pid: asyncio.run(
                        drive(url, c, a.duration, route=a.route, n=a.n, server_pid=pid)
                    )
                )
                limit = max(by_batch.values())
                point["raw_limit_rows_per_s"] = limit
                point["vs_raw_limit"] = round(point["rows_per_s"] / limit, 3)
                # the raw model at the batch size nearest the rows of the service's network calls as
                # they ran (issue 28's "same rows per call" ratio): batch-invariant chunks or wide calls,
                # padding included; a server without that metric: its engine calls' rows, or the chunk
                rows = point["network_rows_per_call"] or a.invariant_rows or point["rows_per_call"]
                same = min(by_batch, key=lambda b: abs(b - rows))
                point["raw_same_batch"] = {"rows": same, "rows_per_s": by_batch[same]}
                point["vs_raw_same_batch"] = round(point["rows_per_s"] / by_batch[same], 3)
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
    limits = [p["raw_limit_rows_per_s"] for points in results["modes"].values() for p in points]
    ax.axhline(statistics.median(limits), ls="--", c="gray", label="raw denoiser, best batch (median)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("denoiser rows / s (NFE x images)")
    ax.set_title(f"{results['model']}: throughput vs concurrency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())

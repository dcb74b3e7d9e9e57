"""The serving engine without HTTP: the traced digits UNet behind `Engine` in this process, 32
closed-loop tasks (bench_service's workload, one image each), alternating with the raw model loop.
What the engine itself costs against raw, and what the network calls run at inside it.

    python bench/bench_engine_inprocess.py --rounds 3 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.api.omp import set_wait_policy  # noqa: E402

set_wait_policy()  # as `kdiff serve` starts: before torch loads libgomp
import torch  # noqa: E402

from bench.bench_invariant import job  # noqa: E402
from bench.bench_service import SAMPLERS, STEPS, RawDenoiser, nfe, workload  # noqa: E402
from service.engine import Engine, EngineConfig, Metrics, ModelHandle  # noqa: E402
from service.engine.omp_teams import release_team  # noqa: E402
from service.models.store import LoadedModel  # noqa: E402


async def served(model: LoadedModel, clients: int, seconds: float, invariant_rows: int) -> dict[str, float]:
    metrics = Metrics()
    handle = ModelHandle("digits", model.denoiser, model.latent_shape, model.device, model.dtype)
    engine = Engine(handle, EngineConfig(64, 1024, 2.0, invariant_rows=invariant_rows or None), metrics)
    calls: list[tuple[int, float]] = []
    call = engine.runner._call

    def timed(x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        t = time.perf_counter()
        out = call(x, sigma, cond)
        calls.append((x.shape[0], time.perf_counter() - t))
        return out

    engine.runner._call = timed  # type: ignore[method-assign]
    engine.start()
    counter, rows, stop = iter(range(10**9)), 0, False
    t0 = time.perf_counter()
    opens, closes = t0 + 1.0, t0 + 1.0 + seconds

    async def client() -> None:
        nonlocal rows
        while not stop:
            body = workload(next(counter))
            request = job(model, body["class_label"], body["sampler"], body["steps"], body["seed"], 1, 1.0)
            await engine.submit(request).wait_done()
            if opens < time.perf_counter() < closes:
                rows += nfe(body)

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    await asyncio.sleep(opens - time.perf_counter())
    busy0, n0 = metrics.call_seconds.labels("digits")._sum.get(), len(calls)
    await asyncio.sleep(closes - time.perf_counter())
    busy1, n1 = metrics.call_seconds.labels("digits")._sum.get(), len(calls)
    stop = True
    await asyncio.gather(*tasks)
    await engine.stop()
    window = calls[n0:n1]
    size = statistics.mode(r for r, _ in window)
    return {
        "rows_per_s": rows / seconds,
        "model_busy": (busy1 - busy0) / seconds,
        "call_rows": size,
        "call_rows_per_s": size / statistics.median(d for r, d in window if r == size),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default torch's: cores)")
    ap.add_argument("--invariant-rows", type=int, default=8)
    a = ap.parse_args()
    raw = RawDenoiser(Path(__file__).resolve().parents[1] / "model_store", "digits", a.threads, jit=True)
    model = raw.model

    def raw_rate() -> float:  # bench_service's raw loop, at the rows of a full call
        return float(raw.measure((a.clients,), 1, 2.0)["rows_per_s_by_batch"][a.clients])

    print(f"torch threads {torch.get_num_threads()}, samplers {SAMPLERS}, steps {STEPS}")
    for r in range(a.rounds):
        before = raw_rate()
        # the serving process runs no torch on its event loop's thread (loads go through a pool that
        # gives its OpenMP team back): this thread's team would throttle the engine's (omp_teams.py)
        release_team()
        point = asyncio.run(served(model, a.clients, a.seconds, a.invariant_rows))
        after = raw_rate()
        base = (before + after) / 2
        served_rows, call_rows = point["rows_per_s"], point["call_rows_per_s"]
        print(
            f"round {r}: raw {a.clients} rows {before:.0f} / {after:.0f}; engine {served_rows:.0f} rows/s"
            f" (busy {point['model_busy']:.3f}) = {served_rows / base:.2f}x raw;"
            f" its {point['call_rows']}-row calls at {call_rows:.0f} rows/s = {call_rows / base:.2f}x",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

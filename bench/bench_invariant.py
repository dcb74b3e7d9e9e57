"""What the batch-invariant mode costs: the engine on the digits model (traced, as `kdiff serve` runs
it), batch-invariant mode off vs every call at a fixed row count, measured interleaved.

Two workloads, each submitted at one instant to a fresh engine:
- ``alone``: the issue's first request by itself (n=2, guided: 4 rows per call): latency;
- ``burst``: N mixed requests (samplers, 10-50 steps, n 1-3, guided or not): images/s.

    python bench/bench_invariant.py --burst 48 --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.api.omp import set_wait_policy  # noqa: E402

set_wait_policy()  # as `kdiff serve` starts: before torch loads libgomp (the engine runs in a thread)
import torch  # noqa: E402

from service.engine import Engine, EngineConfig, JobRequest, JobStatus, ModelHandle  # noqa: E402
from service.models.store import LoadedModel, ModelStore  # noqa: E402
from service.models.traced import trace_denoiser  # noqa: E402
from service.sampling.spec import SamplingSpec  # noqa: E402

SAMPLERS = ["euler", "dpmpp_2m", "heun", "euler_ancestral", "dpmpp_2m_sde"]
STEPS = [10, 20, 50]


def job(
    model: LoadedModel, label: int, sampler: str, steps: int, seed: int, n: int, cfg: float
) -> JobRequest:
    cond, uncond = model.class_conditioning(torch.full([n], label, dtype=torch.long))
    return JobRequest(
        SamplingSpec(sampler, "karras", steps, [seed + i for i in range(n)]), n, cond, uncond, cfg
    )


def alone(model: LoadedModel) -> list[JobRequest]:
    return [job(model, 5, "euler_ancestral", 30, 5095, 2, 3.0)]


def burst(model: LoadedModel, count: int) -> list[JobRequest]:
    return [
        job(model, i % 10, SAMPLERS[i % 5], STEPS[i % 3], i, 1 + i % 3, 1.0 if i % 2 else 3.0)
        for i in range(count)
    ]


def run(model: LoadedModel, reqs: list[JobRequest], invariant_rows: int | None, max_rows: int) -> float:
    handle = ModelHandle("digits", model.denoiser, model.latent_shape, model.device, model.dtype)

    async def go() -> float:
        engine = Engine(handle, EngineConfig(max_rows, 4096, 0.0, invariant_rows=invariant_rows))
        jobs = [engine.submit(r) for r in reqs]
        t0 = time.perf_counter()
        engine.start()
        await asyncio.gather(*(j.wait_done() for j in jobs))
        seconds = time.perf_counter() - t0
        await engine.stop()
        assert all(j.status == JobStatus.succeeded for j in jobs), [j.error for j in jobs]
        return seconds

    return asyncio.run(go())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--burst", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-rows", type=int, default=64)
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 4, 8, 16, 64], help="0 = mode off")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = ModelStore(Path(__file__).resolve().parents[1] / "model_store").load("digits")
    trace_denoiser(model.denoiser)
    workloads = {"alone": alone(model), f"burst of {args.burst}": burst(model, args.burst)}
    images = {name: sum(r.n for r in reqs) for name, reqs in workloads.items()}
    times: dict[tuple[str, int], list[float]] = {}
    run(model, workloads["alone"], None, args.max_rows)  # warm-up (the trace)
    for _ in range(args.repeats):  # interleaved: the machine's load drifts
        for chunk in args.chunks:
            for name, reqs in workloads.items():
                # requests carry no driver: each run starts its own (a finished job copies its request)
                times.setdefault((name, chunk), []).append(run(model, reqs, chunk or None, args.max_rows))
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
        f"max_batch_rows {args.max_rows}, median of {args.repeats}"
    )
    print("| workload | invariant rows | seconds | images/s | vs off |")
    print("|---|---|---|---|---|")
    for name in workloads:
        base = statistics.median(times[(name, 0)]) if 0 in args.chunks else None
        for chunk in args.chunks:
            med = statistics.median(times[(name, chunk)])
            ratio = "" if base is None else f"{med / base:.2f}x"
            print(f"| {name} | {chunk or 'off'} | {med:.2f} | {images[name] / med:.1f} | {ratio} |")


if __name__ == "__main__":
    main()

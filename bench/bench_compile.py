"""KDIFF_COMPILE on the CPU: the one-time compile cost and the per-call time of each model's network,
eager vs the TorchScript trace (KDIFF_JIT; the project's UNet only) vs torch.compile (inductor).

    .venv/bin/python bench/bench_compile.py --models digits,sd1,flux_dev --rows 8 --calls 20

``digits`` is the shipped model; ``sd1`` and ``flux_dev`` are the tiny random-weight test models
(tests/support), loaded by the real loaders. Each mode is timed on the same denoiser inputs (the
model's example input repeated to ``--rows`` rows, at one sigma): the median of ``--calls`` calls
after two warm-up calls, the modes interleaved for ``--rounds`` rounds, each mode's best round.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.models.compiled import compile_denoiser  # noqa: E402
from service.models.store import LoadedModel, ModelStore  # noqa: E402
from service.models.traced import trace_denoiser  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def load(name: str) -> LoadedModel:
    if name == "digits":
        return ModelStore(REPO / "model_store").load(name)
    if name.startswith("sd"):
        from tests.support.sd_tiny import tiny_sd_store

        return ModelStore(tiny_sd_store()).load(name)
    from tests.support.flow_tiny import tiny_flow_store

    return ModelStore(tiny_flow_store()).load(name)


def per_call(model: LoadedModel, rows: int, calls: int) -> float:
    """Median milliseconds of one denoiser call of ``rows`` rows."""
    x, cond = model.example_input()
    x = torch.randn(rows, *x.shape[1:])
    cond = {k: v.expand(rows, *v.shape[1:]).clone() for k, v in cond.items()}
    sigma = torch.full([rows], 0.5 if getattr(model.denoiser, "flow", False) else 2.0)
    times = []
    with torch.inference_mode():
        for i in range(calls + 2):
            start = time.perf_counter()
            model.denoiser(x, sigma, **cond)
            if i >= 2:
                times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="digits,sd1,flux_dev")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each mode's best median")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.rows} rows per call")
    print("| model | eager ms/call | trace (KDIFF_JIT) ms/call | compiled ms/call | trace s | compile s |")
    print("|---|---|---|---|---|---|")
    for name in a.models.split(","):
        models: dict[str, LoadedModel] = {"eager": load(name)}
        cost: dict[str, float | None] = {"trace": None, "compiled": None}
        traced = load(name)
        start = time.perf_counter()
        if trace_denoiser(traced.denoiser, traced.example_input()):
            cost["trace"], models["trace"] = time.perf_counter() - start, traced
        compiled = load(name)
        start = time.perf_counter()
        compile_denoiser(compiled.denoiser, [a.rows], compiled.example_input(), label=name)
        cost["compiled"], models["compiled"] = time.perf_counter() - start, compiled
        best: dict[str, float] = {}
        for _ in range(a.rounds):  # modes interleaved: a load change hits all of them alike
            for mode, model in models.items():
                best[mode] = min(best.get(mode, float("inf")), per_call(model, a.rows, a.calls))

        def fmt(v: float | None, digits: int = 2) -> str:
            return "n/a" if v is None else f"{v:.{digits}f}"

        print(
            f"| {name} | {fmt(best['eager'])} | {fmt(best.get('trace'))} | {fmt(best['compiled'])} | "
            f"{fmt(cost['trace'], 1)} | {fmt(cost['compiled'], 1)} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

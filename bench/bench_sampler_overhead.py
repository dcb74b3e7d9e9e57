"""Sampler overhead: time per step outside the model, ours vs k-diffusion 0.1.1, in one run.

The model is near-free (x * 0.9), so the time is the sampler's own work: its tensor math, its
noise and its Python. Each pair is timed interleaved (ours, theirs, ours, ...) and the minimum over
``--repeats`` runs is reported, with the ratio ours / k-diffusion.

- "default" noise: each library's default (global-RNG normals for ancestral samplers; for the SDE
  samplers k-diffusion's unseeded Brownian tree vs our Brownian-bridge sampler).
- "per-image seeds" (SDE samplers): one seed per image, k-diffusion's BrownianTreeNoiseSampler(seed=[...])
  vs our BrownianNoiseSampler(seeds=[...]).

    python bench/bench_sampler_overhead.py [--steps 20] [--batches 1 64] [--shape 4 16 16] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service import sampling  # noqa: E402
from service.sampling.noise import BrownianNoiseSampler  # noqa: E402
from tests.support.oracle import load  # noqa: E402

SDE = ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde")
NAMES = [
    "euler",
    "euler_ancestral",
    "heun",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpm_fast",
    "dpm_adaptive",
    "dpmpp_2s_ancestral",
    "dpmpp_sde",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_3m_sde",
]


def model(x: torch.Tensor, sigma: torch.Tensor, **kw: Any) -> torch.Tensor:
    return x * 0.9


def _call(mod: Any, name: str, x: torch.Tensor, sigmas: torch.Tensor, noise: Any) -> int:
    """Run one sample; return the number of steps it took (for per-step normalisation)."""
    steps = len(sigmas) - 1
    if name == "dpm_fast":
        mod.sample_dpm_fast(model, x, 0.03, 14.6, steps, disable=True)
        return steps
    if name == "dpm_adaptive":
        _, info = mod.sample_dpm_adaptive(model, x, 0.03, 14.6, disable=True, return_info=True)
        return info["steps"]
    kw = {} if noise is None else {"noise_sampler": noise(x)}
    getattr(mod, f"sample_{name}")(model, x, sigmas, disable=True, **kw)
    return steps


def time_pair(
    kd: Any, name: str, batch: int, shape: list[int], steps: int, repeats: int, per_image: bool
) -> tuple[float, float]:
    x = torch.randn(batch, *shape) * 14.6
    sigmas = sampling.get_sigmas_karras(steps, 0.03, 14.6)
    seeds = list(range(batch))
    ours_noise = theirs_noise = None
    if per_image:

        def ours_noise(x: torch.Tensor) -> Any:
            return BrownianNoiseSampler(x, 0.03, 14.6, seeds=seeds)

        def theirs_noise(x: torch.Tensor) -> Any:
            return kd.sampling.BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=seeds)

    t_ours, t_theirs = [], []
    _call(sampling, name, x, sigmas, ours_noise)  # warm-up, untimed
    _call(kd.sampling, name, x, sigmas, theirs_noise)
    for _ in range(repeats):
        for mod, noise, acc in ((sampling, ours_noise, t_ours), (kd.sampling, theirs_noise, t_theirs)):
            t0 = time.perf_counter()
            n = _call(mod, name, x, sigmas, noise)
            acc.append((time.perf_counter() - t0) / n * 1e3)
    # The minimum over interleaved repeats: other load on the machine only ever adds time.
    return min(t_ours), min(t_theirs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--shape", type=int, nargs="+", default=[4, 16, 16])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    kd = load()
    rows = [
        "| sampler | noise | batch | ours ms/step | k-diffusion ms/step | ratio |",
        "|---|---|---|---|---|---|",
    ]
    cases = [(n, False) for n in NAMES] + [(n, True) for n in SDE]
    for batch in args.batches:
        for name, per_image in cases:
            ours, theirs = time_pair(kd, name, batch, args.shape, args.steps, args.repeats, per_image)
            noise = "per-image seeds" if per_image else "default"
            row = f"| {name} | {noise} | {batch} | {ours:.3f} | {theirs:.3f} | {ours / theirs:.2f} |"
            rows.append(row)
            print(row, flush=True)
    if args.out:
        args.out.write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()

"""Tuned schedules on the Gaussian mixture (issue 16): calibration vs held-out error, and the ratios.

For each budget, every candidate (sampler[:options]) is tuned by ``service.sampling.tune`` on --cal
calibration draws (seed 0, teacher ipndm at 200 karras steps) and measured against the exact ODE map
(scipy DOP853, rtol 1e-12, as tests/sampling/test_tuning.py) on the calibration draws and on the
held-out draws (seed 1: all --held of them and their first 256). The candidate with the lowest
calibration RMS (to the teacher: no held-out draw is used to choose) is then compared with the best
k-diffusion pair and our best untuned pair, re-measured on the same held-out draws
(tests/sampling/test_tuning.py's comparison set), and with --seeds on 256 draws of other seeds.

    python bench/bench_tuning_gmm.py --threads 1 [--nfe 10,5] [--cal 2048] [--held 4096] [--seeds 2-8]

``--solver`` (issue 28 §6) compares, in one run and on the same held-out draws, the best k-diffusion
pair (also run through k-diffusion 0.1.1.post1 itself), the tuned schedule alone (``ipndm`` order 4
or 3, chosen by calibration RMS, as above) and the tuned solver (``ipndm_tuned``: per-step
coefficients fitted with the sigmas; order and regularisation chosen on a validation quarter of the
calibration draws); ``--mixture unseen`` measures on tests/support/gmm.py's UNSEEN_MIXTURE:

    python bench/bench_tuning_gmm.py --threads 1 --solver --mixture unseen --nfe 4,5,8,10 --cal 1024
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.sampling import TuneResult, registry, tune  # noqa: E402
from tests.sampling.test_tuning import _best_pairs, _noise, _ode_map, _rms, held_out_ratios  # noqa: E402
from tests.support import oracle  # noqa: E402
from tests.support.gmm import SIGMA_MAX, SIGMA_MIN, UNSEEN_MIXTURE, GMMDenoiser  # noqa: E402

CANDIDATES = "ipndm;ipndm:max_order=3;uni_pc:order=2;gradient_estimation;plms;deis;dpmpp_3m_sde"


def _spec(text: str) -> tuple[str, dict[str, Any]]:
    name, _, rest = text.partition(":")
    opts = {k: float(v) if "." in v else int(v) for k, v in (kv.split("=") for kv in rest.split(",") if kv)}
    return name, opts


def _seeds(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1)) if text else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nfe", default="10,5")
    ap.add_argument("--cal", type=int, default=2048)
    ap.add_argument("--held", type=int, default=4096)
    ap.add_argument("--samplers", default=CANDIDATES, help="';'-separated sampler[:key=value,...]")
    ap.add_argument("--starts", default="10=2,5=4", help="LM starts per budget (as the test)")
    ap.add_argument("--seeds", default="", help="other held-out seeds for the chosen schedule, e.g. 2-8")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--solver", action="store_true", help="schedule-only vs tuned solver (issue 28 §6)")
    ap.add_argument("--mixture", choices=["project", "unseen"], default="project")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gmm = GMMDenoiser(**UNSEEN_MIXTURE) if args.mixture == "unseen" else GMMDenoiser()
    if args.solver:
        solver_table(gmm, args)
        return
    starts = {int(k): int(v) for k, v in (kv.split("=") for kv in args.starts.split(","))}
    cal, held = _noise(args.cal, seed=0), _noise(args.held, seed=1)
    cal_ref = _ode_map(gmm, cal * SIGMA_MAX, SIGMA_MAX)
    held_ref = _ode_map(gmm, held * SIGMA_MAX, SIGMA_MAX)
    teacher = registry.schedule_sigmas("karras", 200, SIGMA_MIN, SIGMA_MAX).double()
    err = _rms(gmm, "ipndm", {}, teacher, cal, cal_ref)
    print(f"teacher (ipndm, 200 karras steps) RMS to the exact map on the calibration draws: {err:.3g}")
    for nfe in (int(v) for v in args.nfe.split(",")):
        print(f"\n{nfe} calls: {args.cal} calibration draws (seed 0), {args.held} held-out draws (seed 1)")
        tuned: list[tuple[TuneResult, str]] = []
        for text in args.samplers.split(";"):
            name, opts = _spec(text)
            t0 = time.perf_counter()
            res = tune(
                gmm, name, nfe, cal, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, teacher_steps=200,
                starts=starts.get(nfe, 2), options=opts,
            )  # fmt: skip
            seconds = time.perf_counter() - t0
            exact = _rms(gmm, name, res.options, res.sigmas, cal, cal_ref)
            out = _rms(gmm, name, res.options, res.sigmas, held, held_ref)
            out256 = _rms(gmm, name, res.options, res.sigmas, held[:256], held_ref[:256])
            print(
                f"  {text:24s} start {res.init:12s} {res.rms_init:.4g} -> calibration {res.rms_tuned:.4g} "
                f"(teacher) {exact:.4g} (exact) | held-out {out:.4g}, first 256 {out256:.4g} | {seconds:.1f}s"
            )
            tuned.append((res, text))
        res, text = min(tuned, key=lambda t: t[0].rms_tuned)
        print(f"  chosen by calibration RMS: {text}, sigmas {[round(float(s), 4) for s in res.sigmas]}")
        for n in (args.held, 256):
            print("   ", held_out_ratios(gmm, nfe, res.sampler, res.options, res.sigmas, n)[2])
        for seed in _seeds(args.seeds):
            x = _noise(256, seed)
            best = _best_pairs(gmm, nfe, x)
            rms = _rms(gmm, res.sampler, res.options, res.sigmas, x, _ode_map(gmm, x * SIGMA_MAX, SIGMA_MAX))
            print(
                f"    seed {seed}, 256 draws: tuned {rms:.4g} = {rms / best['kdiffusion'][0]:.3f}x the best "
                f"k-diffusion pair, {rms / best['ours'][0]:.3f}x our best untuned pair"
            )


def _kdiffusion_rms(gmm: GMMDenoiser, name: str, sched: str, budget: int, x: torch.Tensor) -> float:
    """The best k-diffusion pair run by k-diffusion 0.1.1.post1 itself, against the exact ODE map."""
    kd = oracle.load().sampling
    if sched not in ("karras", "exponential", "polyexponential"):  # vp takes beta_d / beta_min there
        return math.nan
    info = registry.get_sampler(name)
    opts = {"eta": 0.0} if "eta" in info.bounds else {}
    steps = max(n for n in range(1, budget + 1) if info.expected_nfe(n, opts) <= budget)
    sig = getattr(kd, f"get_sigmas_{sched}")(steps, SIGMA_MIN, SIGMA_MAX).double()
    out = getattr(kd, f"sample_{name}")(gmm, x * sig[0], sig, disable=True, **opts)
    ref = _ode_map(gmm, x * float(sig[0]), float(sig[0]))
    return float((out - ref).pow(2).mean().sqrt())


def solver_table(gmm: GMMDenoiser, args: argparse.Namespace) -> None:
    """Best k-diffusion pair vs tuned schedule vs tuned solver on the same held-out draws, per budget."""
    cal, held = _noise(args.cal, seed=0), _noise(args.held, seed=1)
    held_ref = _ode_map(gmm, held * SIGMA_MAX, SIGMA_MAX)
    kw: dict[str, Any] = {"sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX, "teacher_steps": 200}
    print(
        f"mixture {args.mixture}: {args.cal} calibration draws (seed 0), {args.held} held-out draws (seed 1)"
    )
    print(
        "| calls | best k-diffusion pair | its RMS (ours / k-diffusion) | tuned schedule | RMS | ratio "
        "| tuned solver | RMS | ratio | solver / schedule |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for nfe in (int(v) for v in args.nfe.split(",")):
        t0 = time.perf_counter()
        kd_rms, kd_name, kd_sched = _best_pairs(gmm, nfe, held)["kdiffusion"]
        kd_own = _kdiffusion_rms(gmm, kd_name, kd_sched, nfe, held)
        starts = 2 if nfe >= 8 else 4
        sched = min(
            (tune(gmm, "ipndm", nfe, cal, starts=starts, options=o, **kw) for o in ({}, {"max_order": 3})),
            key=lambda r: r.rms_tuned,
        )
        solved = [
            tune(gmm, "ipndm_tuned", nfe, cal, starts=starts, options=o, solver=True, solver_iters=30, **kw)
            for o in ({}, {"max_order": 3})
        ]
        solver = min(solved, key=lambda r: min(r.validation.values()))
        s_rms = _rms(gmm, "ipndm", sched.options, sched.sigmas, held, held_ref)
        opts = {**solver.options, "coefficients": solver.coefficients}
        v_rms = _rms(gmm, "ipndm_tuned", opts, solver.sigmas, held, held_ref)
        order = solver.options.get("max_order", 4)
        print(
            f"| {nfe} | {kd_name} + {kd_sched} | {kd_rms:.4g} / {kd_own:.4g} | ipndm {sched.options} | "
            f"{s_rms:.4g} | {s_rms / kd_rms:.3f}x | ipndm_tuned max_order {order}, "
            f"reg {solver.reg:g} | {v_rms:.4g} | **{v_rms / kd_rms:.3f}x** | {v_rms / s_rms:.3f} |",
            flush=True,
        )
        print(
            "    validation RMS by (order, reg): "
            + "; ".join(f"{r.options.get('max_order', 4)}: {r.validation}" for r in solved)
            + f" | calibration: schedule {sched.rms_tuned:.4g}, solver {solver.rms_tuned:.4g} | "
            f"{time.perf_counter() - t0:.0f}s",
            file=sys.stderr,
            flush=True,
        )


if __name__ == "__main__":
    main()

"""Sampler quality at a fixed budget of model calls: every registered sampler x a few schedules.

Two measurements, results in one JSON file (and a plot), summarised in docs/SAMPLERS.md:

1. Gaussian mixture (fast, always run unless --skip-gmm). The exact denoiser of
   tests/sampling/gmm.py; 16 fixed start points x the schedule's first sigma are sampled the way
   the service samples (the schedule's n sigmas and a final 0) and compared with the exact
   probability-flow ODE map to sigma = 0 (scipy DOP853, rtol 1e-13; dpm_fast and dpm_adaptive
   stop at the smallest sigma > 0, as in k-diffusion, and are compared there). Error = max
   |x - x_ref| over points and coordinates (as tests/sampling), RMS also stored. Stochastic
   samplers run in their deterministic mode (eta = 0, tcd gamma = 0, restart_times = 0); the three
   with none (ddpm, lcm, er_sde) and every stochastic sampler at its default options are measured
   by the error of the sample mean and covariance of --moments-m runs instead. Budgets are model
   calls: the most steps whose ``expected_nfe`` fits the budget, the calls are counted and stored.
2. Digits Fréchet distance (--fd, ~20 min at n=500 on one CPU thread). model_store/digits with
   its shipped classifier as in ``kdiff eval``: n class-balanced samples per sampler at each budget
   with the karras schedule and default sampler options, Fréchet distance of classifier features
   against the held-out digits.

    python bench/bench_samplers_quality.py --threads 1 [--fd --fd-n 500] \
        [--json docs/bench_samplers_quality.json] [--plot docs/samplers_quality.png]

With --skip-gmm (or without --fd) the JSON keeps the other part from an existing file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from service.sampling import registry  # noqa: E402
from service.sampling.ksampler import SamplingSpec, make_sigmas, make_steppers, start_latents  # noqa: E402
from service.sampling.stepper import run  # noqa: E402
from tests.support.gmm import DIM, GMMDenoiser, ode_reference, start_points  # noqa: E402

GMM_SCHEDULES = ["karras", "exponential", "beta", "kl_optimal", "align_your_steps"]
BUDGETS = [5, 10, 20]
# Samplers whose result is at the smallest sigma > 0 of the schedule (no final denoise to 0).
ENDS_AT_SIGMA_MIN = {"dpm_fast", "dpm_adaptive"}
# dpm_adaptive has no step count: the tightest rtol of this ladder whose model calls fit the budget
# (atol scaled with rtol as in its defaults, 0.0078 at 0.05).
ADAPTIVE_RTOLS = [1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001, 5e-4, 2e-4, 1e-4]
TINY_SIGMA = 1e-8  # the ODE reference "at 0": x(1e-8) - x(0) is O(1e-16) for this mixture


class Counter:
    """Counts model calls; forwards the model's attributes (sigma_min, sigma_max, num_classes...)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.calls = 0

    def __call__(self, x: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        self.calls += 1
        return self.model(x, sigma, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def deterministic_options(info: registry.SamplerInfo) -> dict[str, Any] | None:
    """Options that make a sampler a deterministic ODE solver ({} if it is one), None if it has none."""
    if not info.stochastic:
        return {}
    for key, value in (("eta", 0.0), ("gamma", 0.0), ("restart_times", 0)):
        if key in info.bounds:
            return {key: value}
    return None


def steps_for_budget(info: registry.SamplerInfo, opts: Mapping[str, Any], budget: int) -> int | None:
    fits = [n for n in range(1, budget + 1) if info.expected_nfe(n, opts) <= budget]
    return max(fits) if fits else None


# --- Gaussian mixture ---------------------------------------------------------------------------


class Reference:
    """Exact probability-flow ODE maps of the start points, cached per (sigma_start, sigma_end)."""

    def __init__(self, model: GMMDenoiser) -> None:
        self.model = model
        self.cache: dict[tuple[float, float], Tensor] = {}

    def __call__(self, sigma_start: float, sigma_end: float) -> Tensor:
        key = (sigma_start, sigma_end)
        if key not in self.cache:
            self.cache[key] = self._solve(sigma_start, max(sigma_end, TINY_SIGMA))
        return self.cache[key]

    def _solve(self, s0: float, s1: float) -> Tensor:
        from scipy.integrate import solve_ivp

        x0 = (start_points() * s0).numpy()
        n = x0.shape[0]

        def f(u: float, y: np.ndarray) -> np.ndarray:
            x = torch.from_numpy(y.reshape(n, DIM))
            d = self.model(x, torch.full((n,), math.exp(u), dtype=torch.float64))
            return (x - d).numpy().ravel()

        sol = solve_ivp(f, (math.log(s0), math.log(s1)), x0.ravel(), method="DOP853", rtol=1e-13, atol=1e-13)
        if not sol.success:
            raise RuntimeError(f"reference ODE solve failed: {sol.message}")
        return torch.from_numpy(sol.y[:, -1].reshape(n, DIM))


def gmm_sigmas(name: str, schedule: str, steps: int, opts: Mapping[str, Any], model: Any) -> Tensor:
    spec = SamplingSpec(name, schedule, steps, [0], dict(opts))
    return make_sigmas(spec, model).double()


def gmm_deterministic(
    name: str, opts: dict[str, Any], schedule: str, steps: int, model: GMMDenoiser, ref: Reference
) -> dict[str, Any]:
    """One deterministic run of the 16 start points; the error against the exact flow map."""
    info = registry.get_sampler(name)
    sigmas = gmm_sigmas(name, schedule, steps, opts, model)
    counter = Counter(model)
    x = start_points() * sigmas[0]
    out = run(info.stepper(x.clone(), sigmas, **opts), counter)
    sigma_end = float(sigmas[sigmas > 0].min()) if name in ENDS_AT_SIGMA_MIN else 0.0
    diff = out - ref(float(sigmas[0]), sigma_end)
    return {
        "err_max": float(diff.abs().max()),
        "err_rms": float(diff.pow(2).mean().sqrt()),
        "nfe": counter.calls,
        "sigma_start": float(sigmas[0]),
        "sigma_end": sigma_end,
        "out": out,
    }


def gmm_adaptive(schedule: str, budget: int, model: GMMDenoiser, ref: Reference) -> dict[str, Any] | None:
    best = None
    for rtol in ADAPTIVE_RTOLS:
        opts = {"rtol": rtol, "atol": 0.0078 * rtol / 0.05}
        r = gmm_deterministic("dpm_adaptive", opts, schedule, 2, model, ref)
        if r["nfe"] <= budget:
            best = {**r, "options": opts}
    return best


def gmm_moments(
    name: str, opts: dict[str, Any], steps: int, m: int, model: GMMDenoiser, seed: int = 0
) -> dict[str, Any]:
    """Sample mean and covariance of m seeded runs (karras) vs the mixture's; max abs entry error."""
    spec = SamplingSpec(name, "karras", steps, list(range(seed, seed + m)), dict(opts))
    sigmas = make_sigmas(spec, model).double()
    x = start_latents(spec, (m, DIM), sigmas, dtype=torch.float64)
    counter = Counter(model)
    out = torch.empty_like(x)
    for part, stepper in make_steppers(spec, x, sigmas):
        out[part] = run(stepper, counter)
    mean, cov = model.mean_cov()
    return {
        "mean_err": float((out.mean(0) - mean).abs().max()),
        "cov_err": float((torch.cov(out.T) - cov).abs().max()),
        "nfe": counter.calls,
    }


def _same(a: Tensor, b: Tensor) -> bool:
    return bool(torch.allclose(a, b, rtol=0, atol=1e-9))


def run_gmm(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    model = GMMDenoiser()
    ref = Reference(model)
    x_start, x_cached = ode_reference()
    check = float((ref(float(model.sigma_max), float(model.sigma_min)) - x_cached).abs().max())
    log(f"reference check: our solve vs tests/data/gmm_ode_reference.npz, max diff {check:.2e}")
    names = args.samplers or list(registry.SAMPLERS)
    rows: list[dict[str, Any]] = []
    outs: dict[tuple[str, str, int], Tensor] = {}
    not_deterministic = []
    t0 = time.perf_counter()
    for name in names:
        info = registry.get_sampler(name)
        opts = deterministic_options(info)
        if opts is None:
            not_deterministic.append(name)
            continue
        for schedule in args.schedules:
            for budget in args.budgets:
                if name in ENDS_AT_SIGMA_MIN and not registry.SCHEDULES[schedule].uses_range:
                    # These take only the schedule's end points; a table schedule's end points
                    # depend on the step count (align_your_steps at 2 steps stops at sigma 0.65).
                    rows.append(_row(info, opts, schedule, budget, None, None))
                    continue
                if name == "dpm_adaptive":
                    r = gmm_adaptive(schedule, budget, model, ref)
                    if r is None:
                        rows.append(_row(info, {}, schedule, budget, None, None))
                        continue
                    row = _row(info, r["options"], schedule, budget, None, r)
                else:
                    steps = steps_for_budget(info, opts, budget)
                    if steps is None:
                        rows.append(_row(info, opts, schedule, budget, None, None))
                        continue
                    r = gmm_deterministic(name, opts, schedule, steps, model, ref)
                    if r["nfe"] != info.expected_nfe(steps, opts):
                        raise AssertionError(f"{name}: {r['nfe']} calls, expected_nfe says {steps}")
                    if info.stochastic and budget == args.budgets[0] and schedule == args.schedules[0]:
                        torch.manual_seed(12345)  # the deterministic mode must not draw noise
                        again = gmm_deterministic(name, opts, schedule, steps, model, ref)
                        if not _same(again["out"], r["out"]):
                            raise AssertionError(f"{name} with {opts} is not deterministic")
                    row = _row(info, opts, schedule, budget, steps, r)
                outs[(name, schedule, budget)] = r["out"]
                rows.append(row)
        best10 = min(
            (r["err_max"] for r in rows if r["sampler"] == name and r["budget"] == 10 and r["nfe"]),
            default=math.nan,
        )
        log(f"  {name:<32} best error at 10 calls {best10:.3e}")
    secs = time.perf_counter() - t0
    same_as = _duplicates(names, outs, args)
    # Convergence in distribution: every stochastic sampler at its defaults (karras), and the floor
    # that sampling error alone gives (m exact draws from the mixture).
    moments = []
    for name in names:
        info = registry.get_sampler(name)
        if not info.stochastic or info.name == "dpm_adaptive":
            continue
        for budget in args.budgets:
            steps = steps_for_budget(info, {}, budget)
            if steps is None:
                continue
            m = gmm_moments(name, {}, steps, args.moments_m, model)
            moments.append({"sampler": name, "budget": budget, "steps": steps, **m})
        log(
            f"  moments {name:<24} "
            + " ".join(f"{r['mean_err']:.3f}/{r['cov_err']:.3f}" for r in moments[-3:])
        )
    data = model.sample_data(args.moments_m, torch.Generator().manual_seed(0))
    mean, cov = model.mean_cov()
    floor = {
        "mean_err": float((data.mean(0) - mean).abs().max()),
        "cov_err": float((torch.cov(data.T) - cov).abs().max()),
    }
    return {
        "setup": {
            "points": int(x_start.shape[0]),
            "dim": DIM,
            "sigma_min": model.sigma_min,
            "sigma_max": model.sigma_max,
            "schedules": args.schedules,
            "budgets": args.budgets,
            "error": "max |x - x_ref| over points and coordinates; x_ref the exact ODE map to sigma_end",
            "reference_check_max_diff": check,
            "moments_m": args.moments_m,
        },
        "rows": rows,
        "stochastic_only": not_deterministic,
        "same_as": same_as,
        "moments": moments,
        "moments_floor": floor,
        "target": _target(rows, args.target_budget),
        "seconds": secs,
    }


def _row(
    info: registry.SamplerInfo,
    opts: Mapping[str, Any],
    schedule: str,
    budget: int,
    steps: int | None,
    r: Mapping[str, Any] | None,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "sampler": info.name,
        "origin": info.origin,
        "options": dict(opts),
        "schedule": schedule,
        "budget": budget,
        "steps": steps,
        "nfe": None,
        "err_max": None,
        "err_rms": None,
    }
    if r is not None:
        row.update({k: r[k] for k in ("nfe", "err_max", "err_rms", "sigma_start", "sigma_end")})
    return row


def _duplicates(
    names: list[str], outs: Mapping[tuple[str, str, int], Tensor], args: argparse.Namespace
) -> dict[str, str]:
    """Samplers whose deterministic results equal an earlier sampler's in every cell (to 1e-9)."""
    same: dict[str, str] = {}
    cells = [(s, b) for s in args.schedules for b in args.budgets]
    for i, name in enumerate(names):
        for other in names[:i]:
            if other in same:
                continue
            pairs = [(outs.get((name, s, b)), outs.get((other, s, b))) for s, b in cells]
            if all(a is not None and c is not None and _same(a, c) for a, c in pairs):
                same[name] = other
                break
    return same


def _target(rows: list[dict[str, Any]], budget: int) -> dict[str, Any]:
    """Best pair at ``budget`` calls vs the best k-diffusion sampler there (ratio <= 0.5 is the target).

    Three scopes: every schedule measured; only schedules that use the model's sigma range (not
    align_your_steps, whose tables start at 14.6 and so solve a shorter ODE); karras only. The
    ratio is also given for the RMS error (the best pairs chosen by RMS).
    """
    at = [r for r in rows if r["budget"] == budget and r["err_max"] is not None]
    if not any(r["origin"] == "k-diffusion" for r in at):  # a run restricted to other samplers
        return {"budget": budget, "goal": 0.5, "skipped": "no k-diffusion sampler measured at this budget"}

    def best(pred: Any, key: str) -> dict[str, Any]:
        r = min((r for r in at if pred(r)), key=lambda r: r[key])
        return {k: r[k] for k in ("sampler", "schedule", "options", "nfe", "err_max", "err_rms")}

    out: dict[str, Any] = {"budget": budget, "goal": 0.5, "metric": "err_max"}
    scopes = {
        "all_schedules": lambda r: True,
        "range_schedules": lambda r: registry.SCHEDULES[r["schedule"]].uses_range,
        "karras": lambda r: r["schedule"] == "karras",
    }
    for label, scope in scopes.items():
        entry: dict[str, Any] = {}
        for key in ("err_max", "err_rms"):
            overall = best(scope, key)
            kd = best(lambda r, f=scope: f(r) and r["origin"] == "k-diffusion", key)
            ratio = overall[key] / kd[key]
            if key == "err_max":
                entry.update({"best": overall, "best_k_diffusion": kd, "ratio": ratio, "met": ratio <= 0.5})
            else:
                entry["rms"] = {"best": overall, "best_k_diffusion": kd, "ratio": ratio, "met": ratio <= 0.5}
        out[label] = entry
    return out


# --- digits Fréchet distance --------------------------------------------------------------------


def run_fd(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    from service.models.store import ModelStore
    from service.sampling.ksampler import KSampler
    from service.training.datasets import digits
    from service.training.evaluate import real_baseline
    from service.training.evaluation import accuracy, features, frechet_distance, generate, load_classifier

    loaded = ModelStore(REPO / "model_store").load(args.fd_model)
    clf = load_classifier(loaded.manifest.folder)
    size = loaded.image_size[0]
    base: dict[str, Any] = dict(real_baseline(clf, args.fd_n, size, args.seed))
    train, test = digits("train", size), digits("test", size)
    test_feats = features(clf, test.images)
    # Spread of the real-vs-real FD over other random training subsets of the same size.
    spread = []
    for s in range(1, 6):
        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(s))[: args.fd_n]
        spread.append(frechet_distance(features(clf, train.images[idx]), test_feats))
    base["fd_real_vs_real_subsets"] = spread
    log(
        f"digits: real-vs-real FD {base['fd_real_vs_real']:.2f} "
        f"(other subsets {min(spread):.2f}..{max(spread):.2f})"
    )
    labels = torch.arange(args.fd_n) % loaded.num_classes
    shape = tuple(loaded.latent_shape)
    batches = math.ceil(args.fd_n / 500)
    rows, skipped = [], {}
    names = args.fd_samplers or list(registry.SAMPLERS)
    for name in names:
        info = registry.get_sampler(name)
        if name == "dpm_adaptive":
            skipped[name] = "no fixed number of model calls (adaptive, and run one image at a time)"
            continue
        if info.needs_uncond:
            skipped[name] = "at cfg_scale 1 (uncond = cond) identical to its plain counterpart"
            continue
        for budget in args.fd_budgets:
            steps = steps_for_budget(info, {}, budget)
            if steps is None:
                continue
            counter = Counter(loaded.denoiser)
            t0 = time.perf_counter()
            ks = KSampler(counter, sampler=name, schedule="karras")  # type: ignore[arg-type]
            x = generate(ks, labels, shape, steps, 1.0, args.seed)
            secs = time.perf_counter() - t0
            x = x.clamp(-1, 1)
            row = {
                "sampler": name,
                "origin": info.origin,
                "schedule": "karras",
                "budget": budget,
                "steps": steps,
                "nfe": counter.calls // batches,
                "fd": frechet_distance(features(clf, x), test_feats),
                "accuracy": accuracy(clf, x, labels),
                "seconds": secs,
            }
            rows.append(row)
            log(
                f"  {name:<26} budget {budget:>3} steps {steps:>3} nfe {row['nfe']:>3}  "
                f"FD {row['fd']:7.2f}  acc {row['accuracy']:.3f}  {secs:5.1f}s"
            )
    return {
        "model": args.fd_model,
        "n": args.fd_n,
        "schedule": "karras",
        "cfg_scale": 1.0,
        "seed": args.seed,
        "budgets": args.fd_budgets,
        "baseline": base,
        "rows": rows,
        "skipped": skipped,
    }


# --- plot, tables, main -------------------------------------------------------------------------


def write_plot(gmm: Mapping[str, Any], path: Path, top: int = 6) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    rows = [r for r in gmm["rows"] if r["err_max"] is not None]
    same = gmm.get("same_as", {})

    def series(name: str, schedule: str) -> tuple[list[int], list[float]]:
        pts = sorted(
            (r["nfe"], r["err_max"]) for r in rows if r["sampler"] == name and r["schedule"] == schedule
        )
        return [p[0] for p in pts], [p[1] for p in pts]

    kd_all = [
        n for n in dict.fromkeys(r["sampler"] for r in rows) if registry.SAMPLERS[n].origin == "k-diffusion"
    ]
    kd = [n for n in kd_all if n not in same]  # eta = 0 twins drawn once
    at10 = sorted(
        (r for r in rows if r["budget"] == 10 and r["sampler"] not in same), key=lambda r: r["err_max"]
    )
    new_best = list(dict.fromkeys(r["sampler"] for r in at10 if r["sampler"] not in kd_all))[:top]
    pairs = list(dict.fromkeys((r["sampler"], r["schedule"]) for r in at10))[: top + 2]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 6), sharey=True)
    cmap = plt.get_cmap("tab20")
    for i, name in enumerate(kd):
        ax1.plot(*series(name, "karras"), ls="--", marker=".", color=cmap(i % 20), label=f"{name} (k-diff.)")
    for i, name in enumerate(new_best):
        ax1.plot(
            *series(name, "karras"), ls="-", marker="o", lw=2, color=plt.get_cmap("Dark2")(i), label=name
        )
    dups = ", ".join(f"{a} = {b}" for a, b in same.items() if a in kd_all)
    ax1.set_title("karras: the k-diffusion samplers (dashed) and the best others at 10 calls", fontsize=10)
    ax1.text(
        0.01, 0.01, f"not drawn, equal at eta = 0: {dups}", transform=ax1.transAxes, fontsize=6, wrap=True
    )
    for i, (name, schedule) in enumerate(pairs):
        style = "--" if name in kd_all else "-"
        ax2.plot(
            *series(name, schedule),
            ls=style,
            marker="o",
            color=cmap(i * 2 % 20),
            label=f"{name} + {schedule}",
        )
    ax2.set_title("best (sampler, schedule) pairs at 10 calls, any schedule")
    for ax in (ax1, ax2):
        ax.set(xscale="log", yscale="log", xlabel="model calls (NFE)")
        ax.set_xticks([5, 10, 20], labels=["5", "10", "20"])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)
    ax1.set_ylabel("max |x - x_ref| on the Gaussian mixture (exact ODE map)")
    fig.suptitle("Gaussian-mixture ODE error vs model calls (deterministic mode: eta = 0 where stochastic)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.2e}" if v < 0.01 else f"{v:.3f}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def target_lines(gmm: Mapping[str, Any]) -> list[str]:
    tgt = gmm["target"]
    out = []
    for label in ("all_schedules", "range_schedules", "karras"):
        for metric, t in (("max", tgt[label]), ("rms", tgt[label]["rms"])):
            b, k = t["best"], t["best_k_diffusion"]
            key = "err_max" if metric == "max" else "err_rms"
            out.append(
                f"{label} ({metric} error) at {tgt['budget']} calls: best {b['sampler']} + {b['schedule']} "
                f"{b[key]:.3e} / best k-diffusion {k['sampler']} + {k['schedule']} {k[key]:.3e} "
                f"= {t['ratio']:.3f} ({'met' if t['met'] else 'NOT met'}; goal <= 0.5)"
            )
    return out


def markdown(result: Mapping[str, Any]) -> str:
    """The results tables of docs/SAMPLERS.md."""
    lines: list[str] = []
    gmm, fd = result.get("gmm"), result.get("fd")
    if gmm:
        sched, budgets = gmm["setup"]["schedules"], gmm["setup"]["budgets"]
        cell = {(r["sampler"], r["schedule"], r["budget"]): r for r in gmm["rows"]}
        others = [s for s in sched if s not in ("karras", "exponential")]
        head = ["sampler", "mode", "calls"]
        head += (
            [f"karras {b}" for b in budgets] + [f"exp. {b}" for b in budgets] + [f"{s} 10" for s in others]
        )
        body = []
        for name in dict.fromkeys(r["sampler"] for r in gmm["rows"]):
            k = [cell.get((name, "karras", b)) for b in budgets]
            opts = next(r["options"] for r in gmm["rows"] if r["sampler"] == name)
            mode = (
                ", ".join(f"{a}={v:g}" for a, v in opts.items()) if name != "dpm_adaptive" else "rtol ladder"
            )
            calls = "/".join(str(r["nfe"]) if r and r["nfe"] else "—" for r in k)
            vals = [_fmt(r["err_max"]) if r else "—" for r in k]
            vals += [_fmt((cell.get((name, "exponential", b)) or {}).get("err_max")) for b in budgets]
            vals += [_fmt((cell.get((name, s, 10)) or {}).get("err_max")) for s in others]
            dup = gmm["same_as"].get(name)
            body.append([f"{name} (= {dup})" if dup else name, mode or "—", calls, *vals])
        for name in gmm["stochastic_only"]:
            body.append([name, "stochastic only", "", "see moments", *[""] * (len(head) - 4)])
        lines += ["Gaussian-mixture ODE error (max abs) by schedule and budget:", "", *_table(head, body), ""]
        # The best pairs at each budget (duplicates of an earlier sampler left out).
        body = []
        for b in budgets:
            ranked = sorted(
                (
                    r
                    for r in gmm["rows"]
                    if r["budget"] == b and r["err_max"] is not None and r["sampler"] not in gmm["same_as"]
                ),
                key=lambda r: r["err_max"],
            )
            for i, r in enumerate(ranked[:6]):
                kd = " (k-diffusion)" if r["origin"] == "k-diffusion" else ""
                body.append(
                    [
                        str(b),
                        str(i + 1),
                        f"{r['sampler']}{kd}",
                        r["schedule"],
                        str(r["nfe"]),
                        _fmt(r["err_max"]),
                    ]
                )
        lines += [
            "Best pairs per budget:",
            "",
            *_table(["budget", "rank", "sampler", "schedule", "calls", "error"], body),
        ]
        lines += ["", "Target:", "", *(f"- {t}" for t in target_lines(gmm)), ""]
        mom: dict[str, dict[int, Any]] = {}
        for r in gmm["moments"]:
            mom.setdefault(r["sampler"], {})[r["budget"]] = r
        head = ["sampler (default options)"] + [f"{b} calls: mean / cov" for b in budgets]
        body = [
            [name, *(f"{m[b]['mean_err']:.3f} / {m[b]['cov_err']:.3f}" if b in m else "—" for b in budgets)]
            for name, m in mom.items()
        ]
        fl = gmm["moments_floor"]
        body.append(
            [
                f"exact draws (floor, m={gmm['setup']['moments_m']})",
                *[f"{fl['mean_err']:.3f} / {fl['cov_err']:.3f}"] * len(budgets),
            ]
        )
        lines += [
            "Stochastic samplers, karras: max abs error of the sample mean / covariance:",
            "",
            *_table(head, body),
            "",
        ]
    if fd:
        at = {(r["sampler"], r["budget"]): r for r in fd["rows"]}
        bs = fd["budgets"]
        head = ["sampler", "calls"] + [f"FD {b}" for b in bs] + [f"accuracy {b}" for b in bs] + ["seconds"]
        body = []
        for name in dict.fromkeys(r["sampler"] for r in fd["rows"]):
            rs = [at.get((name, b)) for b in bs]
            body.append(
                [
                    name,
                    "/".join(str(r["nfe"]) if r else "—" for r in rs),
                    *(f"{r['fd']:.2f}" if r else "—" for r in rs),
                    *(f"{r['accuracy']:.3f}" if r else "—" for r in rs),
                    f"{sum(r['seconds'] for r in rs if r):.0f}",
                ]
            )
        base = fd["baseline"]
        sub = base.get("fd_real_vs_real_subsets", [])
        lines += [
            f"Digits Fréchet distance, karras, n={fd['n']}, default options; real-vs-real "
            f"{base['fd_real_vs_real']:.2f}"
            + (f" (other subsets {min(sub):.2f}..{max(sub):.2f})" if sub else ""),
            "",
            *_table(head, body),
            "",
            *(f"- {k}: not run ({v})" for k, v in fd["skipped"].items()),
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--samplers", type=lambda s: s.split(","), help="comma-separated (default: all)")
    p.add_argument("--schedules", type=lambda s: s.split(","), default=GMM_SCHEDULES)
    p.add_argument("--budgets", type=lambda s: [int(v) for v in s.split(",")], default=BUDGETS)
    p.add_argument("--target-budget", type=int, default=10)
    p.add_argument("--moments-m", type=int, default=4000, help="runs per stochastic moment estimate")
    p.add_argument("--skip-gmm", action="store_true", help="only the digits part (needs --fd)")
    p.add_argument("--fd", action="store_true", help="also the digits Fréchet distance (slow)")
    p.add_argument("--fd-n", type=int, default=500, help="digits samples per (sampler, budget)")
    p.add_argument("--fd-budgets", type=lambda s: [int(v) for v in s.split(",")], default=[10, 20])
    p.add_argument("--fd-samplers", type=lambda s: s.split(","), help="comma-separated (default: all)")
    p.add_argument("--fd-model", default="digits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", type=Path, default=REPO / "docs" / "bench_samplers_quality.json")
    p.add_argument("--plot", type=Path, default=REPO / "docs" / "samplers_quality.png")
    p.add_argument("--markdown", type=Path, help="also write the results table (markdown) here")
    p.add_argument("--render-only", action="store_true", help="only redraw plot and table from --json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.render_only:
        stored = json.loads(args.json.read_text())
        if "gmm" in stored and args.plot:
            write_plot(stored["gmm"], args.plot)
        table = markdown(stored)
        if args.markdown:
            args.markdown.write_text(table)
        print(table)
        return 0

    def log(msg: str) -> None:
        print(msg, flush=True)

    result: dict[str, Any] = json.loads(args.json.read_text()) if args.json.exists() else {}
    result.update(
        {
            "command": "python bench/bench_samplers_quality.py "
            + " ".join(sys.argv[1:] if argv is None else argv),
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {_cpu_name()}, {_cores()} cores, threads={args.threads}",
            "torch": torch.__version__,
        }
    )
    t0 = time.perf_counter()
    if not args.skip_gmm:
        result["gmm"] = run_gmm(args, log)
        for line in target_lines(result["gmm"]):
            log(line)
    if args.fd:
        result["fd"] = run_fd(args, log)
    result["seconds_total_last_run"] = time.perf_counter() - t0
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1, default=float) + "\n")
    log(f"results written to {args.json}")
    if "gmm" in result and args.plot:
        write_plot(result["gmm"], args.plot)
        log(f"plot written to {args.plot}")
    table = markdown(result)
    if args.markdown:
        args.markdown.write_text(table)
    print(table)
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


if __name__ == "__main__":
    raise SystemExit(main())

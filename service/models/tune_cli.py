"""`kdiff tune-schedule --model digits --sampler dpmpp_2m --nfe 5,8,10`: schedules tuned to a store model.

For each (sampler, NFE) it runs :func:`service.sampling.tuning.tune` (teacher trajectory, best fixed
schedule, Levenberg-Marquardt on the log-sigmas; after Optimal Stepsize Distillation, Pei et al. 2025)
on seeded calibration noise, measures the RMS error to the teacher on held-out noise for karras and
the tuned sigmas, and writes ``<model>/schedules/<sampler>-<nfe>.json`` and a plot against karras.
A sampler with fitted coefficients (``ipndm_tuned``) gets them fitted with its sigmas (``tune(...,
solver=True)``); its file records them, the options they were fitted at, and the held-out error of
the schedule alone next to the solver's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from service.cli_args import add_threads, set_threads

CALIBRATION_SEED = 1_000_000  # calibration and held-out seeds stay clear of kdiff eval's 0..n-1
HELDOUT_SEED = 2_000_000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="digits", help="model name in the store")
    p.add_argument("--model-store", default="model_store", help="model store folder")
    p.add_argument("--sampler", required=True, help="sampler name(s), comma-separated")
    p.add_argument("--nfe", default="5,8,10", help="comma-separated model-call budgets")
    p.add_argument("--calibration", type=int, default=20, help="calibration images (noise seeds)")
    p.add_argument("--conditions", action="store_true", help="calibrate on class labels 0..K-1 in turn")
    p.add_argument("--prompt", help="text models (Stable Diffusion): the calibration prompt")
    p.add_argument("--teacher-steps", type=int, default=40, help="teacher (ipndm, karras) steps")
    p.add_argument("--iters", type=int, default=8, help="Levenberg-Marquardt iterations per start")
    p.add_argument("--starts", type=int, default=1, help="fixed schedules to start from (best first)")
    p.add_argument("--method", default="lm", choices=["lm", "search"])
    p.add_argument("--options", default="", help="sampler options, e.g. max_order=3 (ipndm_tuned)")
    p.add_argument("--reg", type=float, help="tuned solver: coefficient penalty (default: by validation)")
    p.add_argument("--device", default="cpu")
    add_threads(p)
    p.add_argument("--out", help="folder for the files (default: the model's schedules/ folder)")


def main(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except ValueError as exc:  # unknown names, nfe a sampler cannot make, NaN output: one line
        print(f"kdiff tune-schedule: error: {exc}", file=sys.stderr)
        return 1


class _Counter:
    """Counts model calls."""

    def __init__(self, model: Any) -> None:
        self.model, self.calls = model, 0

    def __call__(self, x: Any, sigma: Any, **kw: Any) -> Any:
        self.calls += 1
        return self.model(x, sigma, **kw)


def _conditioning(model: Any, n: int, conditions: bool, prompt: str | None) -> dict[str, Any]:
    """Calibration conditioning: class labels 0..K-1 in turn (--conditions) or the null class; a prompt."""
    import torch

    if model.conditioning == "class":
        labels = torch.arange(n) % model.num_classes if conditions else torch.full([n], model.num_classes)
        return dict(model.class_conditioning(labels.to(model.device))[0])
    if model.conditioning == "text":
        h, w = model.image_size
        return dict(model.text_model.text_conditioning(prompt or "", None, n, h, w, guided=False)[0])
    return {}


def _rms(a: Any, b: Any) -> float:
    return float((a.double() - b.double()).pow(2).mean().sqrt())


def _run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from service.models.store import ModelStore
    from service.models.tuned import file_for
    from service.sampling import registry
    from service.sampling.noise import NoiseSource
    from service.sampling.stepper import run
    from service.sampling.tuning import deterministic_options, steps_for_nfe, takes_coefficients, tune

    set_threads(args)
    samplers = [s.strip() for s in args.sampler.split(",") if s.strip()]
    nfes = [int(v) for v in args.nfe.split(",") if v.strip()]
    options = _options(args.options)
    for s in samplers:  # bad names, options and budgets fail before the model loads
        info = registry.get_sampler(s)
        for nfe in nfes:
            steps_for_nfe(info, nfe, deterministic_options(info, options))
    model = ModelStore(args.model_store).load(args.model, args.device)
    den = model.denoiser
    lo, hi = float(den.sigma_min), float(den.sigma_max)
    out_dir = Path(args.out) if args.out else file_for(model.manifest.folder, "x", 0).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    n = args.calibration
    shape = model.latent_shape
    cal_seeds = list(range(CALIBRATION_SEED, CALIBRATION_SEED + n))
    held_seeds = list(range(HELDOUT_SEED, HELDOUT_SEED + n))
    x_cal = NoiseSource(cal_seeds).randn(shape, model.device, torch.float32)
    x_held = NoiseSource(held_seeds).randn(shape, model.device, torch.float32)
    extra = _conditioning(model, n, args.conditions, args.prompt)
    jobs = [(s, nfe) for s in samplers for nfe in nfes]
    total_t = time.perf_counter()
    bar = tqdm(total=len(jobs) * args.iters * args.starts, desc="tune-schedule", unit="it", file=sys.stderr)
    for sampler, nfe in jobs:
        bar.set_postfix_str(f"{sampler} {nfe} NFE")
        counter = _Counter(den)
        done = 0

        def progress(i: int, total: int) -> None:
            nonlocal done
            bar.update(1)
            done += 1

        cpu0 = time.process_time()
        with torch.no_grad():
            res = tune(
                counter,
                sampler,
                nfe,
                x_cal,
                extra_args=extra,
                sigma_min=lo,
                sigma_max=hi,
                teacher_steps=args.teacher_steps,
                method=args.method,
                iters=args.iters,
                starts=args.starts,
                options=options,
                solver=takes_coefficients(registry.get_sampler(sampler)),
                reg=args.reg,
                progress=progress,
            )
            bar.update(max(0, args.iters * args.starts - done))
            calls, cpu = counter.calls, time.process_time() - cpu0
            held = _heldout(res, den, x_held, extra, lo, hi, args.teacher_steps, run, registry)
        record = {
            "model": args.model,
            "sampler": sampler,
            "nfe": nfe,
            "steps": res.steps,
            "sigmas": [float(v) for v in res.sigmas],
            **({} if res.coefficients is None else {"coefficients": res.coefficients}),
            **(
                {}
                if res.schedule_sigmas is None
                else {"schedule_sigmas": [float(v) for v in res.schedule_sigmas]}
            ),
            "options": res.options,
            "method": {
                "name": "lm" if args.method == "lm" else "search",
                "about": "best fixed schedule (karras, karras rho=3, exponential, kl_optimal), then "
                "Levenberg-Marquardt on the log-sigma gaps against a teacher's x0 "
                "(after OSS, Pei et al. 2025)",
                "init": res.init,
                "iterations": res.iterations,
                "starts": args.starts,
                "teacher": res.teacher,
                **_solver_method(res),
            },
            "calibration": {
                "n": n,
                "seeds": [cal_seeds[0], cal_seeds[-1]],
                "conditions": "class labels 0..K-1 in turn" if args.conditions else "unconditional",
                **({"prompt": args.prompt} if args.prompt else {}),
            },
            "error": {
                "metric": "RMS distance to the teacher's x0",
                "calibration": {
                    "karras": res.rms_karras,
                    "init": res.rms_init,
                    **({} if res.rms_schedule is None else {"schedule": res.rms_schedule}),
                    "tuned": res.rms_tuned,
                },
                "heldout": held,
            },
            "cost": {
                "seconds": round(res.seconds, 2),
                "cpu_seconds": round(cpu, 2),
                "model_calls": calls,
                "sampler_runs": res.runs,
            },
            "created": time.strftime("%Y-%m-%d"),
        }
        path = out_dir / f"{sampler}-{nfe}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        _plot(record, den, lo, hi, path.with_suffix(".png"))
        sched = f" -> schedule alone {held['schedule']:.4f}" if "schedule" in held else ""
        tqdm.write(
            f"{sampler} {nfe} NFE: RMS to teacher (held-out) karras {held['karras']:.4f}{sched} -> tuned "
            f"{held['tuned']:.4f}; {res.seconds:.1f}s, {calls} model calls; wrote {path}",
            file=sys.stderr,
        )
    bar.close()
    print(f"tuned {len(jobs)} schedule(s) in {time.perf_counter() - total_t:.1f}s -> {out_dir}")
    return 0


def _options(text: str) -> dict[str, Any]:
    """``max_order=3,x=0.5`` -> {"max_order": 3, "x": 0.5}."""
    out: dict[str, Any] = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        key, _, value = item.partition("=")
        out[key.strip()] = float(value) if "." in value or "e" in value else int(value)
    return out


def _solver_method(res: Any) -> dict[str, Any]:
    """How a tuned solver's coefficients were fitted (nothing for a schedule alone)."""
    if res.coefficients is None:
        return {}
    return {
        "solver": "per-step coefficients fitted jointly with the sigmas (Levenberg-Marquardt, after S4S, "
        "Frankel et al. 2025), regularised toward the analytic iPNDM coefficients",
        "reg": res.reg,
        "validation": res.validation,
    }


def _heldout(
    res: Any, den: Any, x: Any, extra: dict, lo: float, hi: float, teacher_steps: int, run: Any, registry: Any
) -> dict[str, float]:
    """RMS to the teacher's x0 on held-out noise: karras vs the tuned sigmas."""
    t_info = registry.get_sampler(res.teacher["sampler"])
    t_sig = registry.schedule_sigmas("karras", teacher_steps, lo, hi).double()
    target = run(t_info.stepper(x * hi, t_sig), den, extra)
    info = registry.get_sampler(res.sampler)
    k_sig = registry.schedule_sigmas("karras", res.steps, lo, hi).double()
    karras = run(info.stepper(x * hi, k_sig, **res.options), den, extra)
    fitted = {} if res.coefficients is None else {"coefficients": res.coefficients}
    tuned = run(info.stepper(x * hi, res.sigmas, **res.options, **fitted), den, extra)
    out = {"n": int(x.shape[0]), "karras": _rms(karras, target), "tuned": _rms(tuned, target)}
    if res.schedule_sigmas is not None:  # the tuned schedule alone, with the analytic coefficients
        out["schedule"] = _rms(
            run(info.stepper(x * hi, res.schedule_sigmas, **res.options), den, extra), target
        )
    return out


def _plot(record: dict[str, Any], den: Any, lo: float, hi: float, path: Path) -> None:
    """Tuned sigmas against karras at the same steps (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from service.sampling import registry

    steps = record["steps"]
    karras = registry.schedule_sigmas("karras", steps, lo, hi).tolist()[:-1]
    tuned = record["sigmas"][:-1]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(steps), karras, marker="o", label="karras")
    ax.plot(range(steps), tuned, marker="s", label="tuned")
    ax.set(
        yscale="log",
        xlabel="step",
        ylabel="sigma",
        title=f"{record['model']}: {record['sampler']}, {record['nfe']} NFE",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)

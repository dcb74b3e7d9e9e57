"""Evaluate a digits model over samplers x NFE against the held-out digits; table + plot."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from service.models.stepcache import STORE, CacheSpec, cache_rows
from service.models.stepcache.support import cache_methods
from service.models.tuned import TUNED, TunedEntry, tuned_entry
from service.sampling.ksampler import KSampler
from service.sampling.schedules import CustomSchedule
from service.training.datasets import digits
from service.training.evaluation import (
    EvalRow,
    accuracy,
    features,
    frechet_distance,
    generate,
    load_classifier,
    steps_for_nfe,
)


def real_baseline(classifier: Any, n: int, image_size: int, seed: int = 0) -> dict[str, float]:
    """FD between ``n`` training digits and the held-out digits: the scale for generated-vs-real FD.

    Same sample sizes as the generated comparison, so both carry the same finite-sample bias.
    """
    train, test = digits("train", image_size), digits("test", image_size)
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[: min(n, len(train))]
    fd = frechet_distance(features(classifier, train.images[idx]), features(classifier, test.images))
    return {
        "fd_real_vs_real": fd,
        "n_train": int(len(idx)),
        "n_test": len(test),
        "classifier_test_accuracy": accuracy(classifier, test.images, test.labels),
    }


def run_eval(
    folder: Path,
    samplers: list[str],
    schedule: str,
    nfes: list[int],
    n: int,
    cfg_scale: float = 1.0,
    seed: int = 0,
    classifier_folder: Path | None = None,
    log: Callable[[str], None] = print,
    caches: list[CacheSpec | None] | None = None,
) -> dict[str, Any]:
    """``caches``: step-cache settings to run each (sampler, NFE) with (None: no cache); a cached row
    reports its cost in full-network-equivalent evaluations per image (skipped parts' FLOPs counted)."""
    from service.models.unet import load_denoiser
    from service.sampling import registry

    for name in samplers:  # unknown names fail before the slow part, not after it
        registry.get_sampler(name)
    denoiser, config = load_denoiser(folder, "cpu", torch.float32)
    caches = caches or [None]
    if any(c is not None for c in caches):
        caches = [None if c is None else c.resolved(cache_methods(denoiser), "--cache") for c in caches]
        STORE.fixed_shape = False  # one job per call here: nothing to keep batch-invariant with
    cheap = cached_cost(denoiser, config) if any(c is not None for c in caches) else 1.0
    if config.num_classes != 10 or config.in_channels != 1:
        raise ValueError("kdiff eval measures class-conditional digit models (num_classes=10, in_channels=1)")
    clf = load_classifier(classifier_folder or folder)
    if clf.config["image_size"] != config.image_size:
        raise ValueError(
            f"classifier is for {clf.config['image_size']}px images, the model makes {config.image_size}px"
        )
    base = real_baseline(clf, n, config.image_size, seed)
    test_feats = features(clf, digits("test", config.image_size).images)
    labels = torch.arange(n) % config.num_classes
    log(f"model {folder}  n={n}  cfg_scale={cfg_scale}  schedule={schedule}")
    log(
        f"real-vs-real FD baseline ({base['n_train']} train vs {base['n_test']} held-out digits): "
        f"{base['fd_real_vs_real']:.3f}; classifier held-out accuracy {base['classifier_test_accuracy']:.4f}"
    )
    if cheap < 1.0:
        log(f"a cached evaluation costs {cheap:.3f} of a full one (FLOPs)")
    header = (
        f"{'sampler':<20}{'NFE':>5}{'steps':>7}{'cache':>16}{'cost':>7}{'accuracy':>10}{'FD':>9}"
        f"{'FD/base':>9}{'seconds':>9}"
    )
    log(header)
    log("-" * len(header))
    rows: list[EvalRow] = []
    skipped: list[dict[str, Any]] = []
    cell = functools.partial(
        _eval_cell, folder, denoiser, config, clf, test_feats, labels, schedule=schedule,
        cfg_scale=cfg_scale, seed=seed, cheap=cheap, skipped=skipped, log=log,
    )  # fmt: skip
    for sampler in samplers:
        for nfe in nfes:
            for cache in caches:
                row = cell(sampler=sampler, nfe=nfe, cache=cache)
                if row is not None:
                    rows.append(row)
                    log(
                        f"{sampler:<20}{nfe:>5}{row.steps:>7}{row.cache:>16}{row.cost:>7.2f}{row.accuracy:>10.4f}"
                        f"{row.fd:>9.3f}{row.fd / base['fd_real_vs_real']:>9.2f}{row.seconds:>9.1f}"
                    )
    return {
        "model": str(folder),
        "n": n,
        "cfg_scale": cfg_scale,
        "seed": seed,
        "baseline": base,
        "rows": [r.as_dict() for r in rows],
        "skipped": skipped,
    }


def _eval_cell(
    folder: Path,
    denoiser: Any,
    config: Any,
    clf: Any,
    test_feats: Any,
    labels: torch.Tensor,
    sampler: str,
    schedule: str,
    nfe: int,
    cache: CacheSpec | None,
    cfg_scale: float,
    seed: int,
    cheap: float,
    skipped: list[dict[str, Any]],
    log: Callable[[str], None],
) -> EvalRow | None:
    """One (sampler, NFE, cache) cell: its samples' accuracy and FD, time and model cost."""
    steps = steps_for_nfe(sampler, nfe)
    name = "none" if cache is None else cache_label(cache)
    t0 = time.perf_counter()
    shape = (config.in_channels, config.image_size, config.image_size)
    STORE.reset_counts()
    try:
        sched: Any = schedule  # "tuned": the model's file for this sampler and step count
        entry = TunedEntry(()) if schedule != TUNED else tuned_entry(folder, folder.name, sampler, steps)
        if schedule == TUNED:  # a tuned solver's file also brings its coefficients and options
            sched = CustomSchedule(entry.sigmas)
        ks = KSampler(
            denoiser, sampler=sampler, schedule=sched, coefficients=entry.coefficients, **entry.options
        )
        x = generate(ks, labels, shape, steps, cfg_scale, seed, cache)
    except ValueError as exc:  # e.g. dpm_fast at one step: skip this cell, keep the table
        skipped.append({"sampler": sampler, "nfe": nfe, "steps": steps, "cache": name, "reason": str(exc)})
        log(f"{sampler:<20}{nfe:>5}{steps:>7}{name:>16}  not run: {exc}")
        return None
    secs = time.perf_counter() - t0
    cost = float(nfe)
    if cache is not None and STORE.ran + STORE.reused:  # the share of evaluations that skipped the deep part
        cost = nfe * (1 - STORE.reused / (STORE.ran + STORE.reused) * (1 - cheap))
    fd = frechet_distance(features(clf, x.clamp(-1, 1)), test_feats)
    acc = accuracy(clf, x.clamp(-1, 1), labels)
    return EvalRow(sampler, schedule, nfe, steps, acc, fd, secs, name, round(cost, 3))


def cache_label(cache: CacheSpec) -> str:
    return f"{cache.method}:{cache.interval}" if cache.interval else f"{cache.method}:t{cache.threshold:g}"


def parse_cache_arg(text: str) -> list[CacheSpec | None]:
    """``--cache none,deepcache:3,deepcache:t0.1``: a method, then :N (interval) or :tX (threshold)."""
    out: list[CacheSpec | None] = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        method, _, setting = item.partition(":")
        if method == "none":
            out.append(None)
        elif setting.startswith("t"):
            out.append(CacheSpec(method, threshold=float(setting[1:])))
        else:
            out.append(CacheSpec(method, interval=int(setting) if setting else None))
    return out


def cached_cost(denoiser: Any, config: Any) -> float:
    """FLOPs of a cached evaluation over a full one (torch's FLOP counter, 8 rows)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = denoiser.inner_model
    x = torch.zeros(8, config.in_channels, config.image_size, config.image_size)
    t, label = torch.zeros(8), torch.arange(8) % 10
    rows = cache_rows(CacheSpec("deepcache", interval=2), 8)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as full:
            net(x, t, class_cond=label, cache=rows)
        with FlopCounterMode(display=False) as cached:
            net(x, t, class_cond=label, cache=rows)
    return cached.get_total_flops() / full.get_total_flops()


def write_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_fd) = plt.subplots(1, 2, figsize=(10, 4))
    for sampler in dict.fromkeys(r["sampler"] for r in result["rows"]):
        rows = sorted((r for r in result["rows"] if r["sampler"] == sampler), key=lambda r: r["nfe"])
        nfe = [r["nfe"] for r in rows]
        ax_acc.plot(nfe, [r["accuracy"] for r in rows], marker="o", label=sampler)
        ax_fd.plot(nfe, [r["fd"] for r in rows], marker="o", label=sampler)
    base = result["baseline"]["fd_real_vs_real"]
    ax_fd.axhline(base, color="k", ls="--", label="real vs real")
    ax_fd.axhline(2 * base, color="grey", ls=":", label="2x real vs real")
    ax_acc.set(xlabel="NFE", ylabel="class accuracy", xscale="log", title="Class accuracy")
    ax_fd.set(
        xlabel="NFE",
        ylabel="Frechet distance (classifier features)",
        xscale="log",
        yscale="log",
        title="Frechet distance",
    )
    for ax in (ax_acc, ax_fd):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)

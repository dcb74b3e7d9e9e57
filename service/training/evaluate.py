"""Evaluate a digits model over samplers x NFE against the held-out digits; table + plot."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from service.models.tuned import TUNED, tuned_sigmas
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
) -> dict[str, Any]:
    from service.models.unet import load_denoiser
    from service.sampling import registry

    for name in samplers:  # unknown names fail before the slow part, not after it
        registry.get_sampler(name)
    denoiser, config = load_denoiser(folder, "cpu", torch.float32)
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
    header = f"{'sampler':<20}{'NFE':>5}{'steps':>7}{'accuracy':>10}{'FD':>9}{'FD/base':>9}{'seconds':>9}"
    log(header)
    log("-" * len(header))
    rows: list[EvalRow] = []
    skipped: list[dict[str, Any]] = []
    for sampler in samplers:
        for nfe in nfes:
            steps = steps_for_nfe(sampler, nfe)
            t0 = time.perf_counter()
            shape = (config.in_channels, config.image_size, config.image_size)
            try:
                sched: Any = schedule  # "tuned": the model's file for this sampler and step count
                if schedule == TUNED:
                    sched = CustomSchedule(tuned_sigmas(folder, folder.name, sampler, steps))
                ks = KSampler(denoiser, sampler=sampler, schedule=sched)
                x = generate(ks, labels, shape, steps, cfg_scale, seed)
            except ValueError as exc:  # e.g. dpm_fast at one step: skip this cell, keep the table
                skipped.append({"sampler": sampler, "nfe": nfe, "steps": steps, "reason": str(exc)})
                log(f"{sampler:<20}{nfe:>5}{steps:>7}  not run: {exc}")
                continue
            secs = time.perf_counter() - t0
            fd = frechet_distance(features(clf, x.clamp(-1, 1)), test_feats)
            row = EvalRow(sampler, schedule, nfe, steps, accuracy(clf, x.clamp(-1, 1), labels), fd, secs)
            rows.append(row)
            log(
                f"{sampler:<20}{nfe:>5}{steps:>7}{row.accuracy:>10.4f}{fd:>9.3f}"
                f"{fd / base['fd_real_vs_real']:>9.2f}{secs:>9.1f}"
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

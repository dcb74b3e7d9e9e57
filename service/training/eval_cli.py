"""`kdiff eval`: class accuracy and Fréchet distance per sampler x NFE, a table and a plot."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from service.cli_args import add_threads, set_threads

REPO_ROOT = Path(__file__).resolve().parents[2]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="digits", help="model-store name or a model folder")
    p.add_argument("--samplers", default="dpmpp_2m", help="comma-separated sampler names")
    p.add_argument("--schedule", default="karras")
    p.add_argument("--nfe", default="20", help="comma-separated NFE budgets, e.g. 5,10,20")
    p.add_argument("--n", type=int, default=1000, help="samples per row (balanced over classes)")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classifier", help="folder with classifier.safetensors (default: the model folder)")
    p.add_argument(
        "--cache",
        help="step-cache settings to compare, e.g. none,deepcache:3,deepcache:t0.1 (docs/STEP_CACHE.md)",
    )
    p.add_argument("--plot", help="write a quality-vs-NFE plot (PNG) here")
    p.add_argument("--json", help="write the results as JSON here")
    add_threads(p)
    p.add_argument(
        "--train-classifier",
        metavar="FOLDER",
        help="instead of evaluating: train the digits classifier and save it in FOLDER",
    )


def resolve_model(name: str) -> Path:
    """A folder path, or a name inside model_store/ (cwd first, then the repository's)."""
    path = Path(name)
    if path.is_dir():
        return path
    if "/" in name or "\\" in name or name.startswith("."):
        raise FileNotFoundError(f"model folder {name} does not exist")
    for root in (Path("model_store"), REPO_ROOT / "model_store"):
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(f"no model named {name!r} in model_store/")


def _train_classifier(folder: str) -> int:
    from service.training.datasets import digits
    from service.training.evaluation import accuracy, save_classifier, train_classifier

    train, test = digits("train"), digits("test")
    t0 = time.perf_counter()
    clf = train_classifier(train.images, train.labels)
    save_classifier(clf, folder)
    train_acc, test_acc = accuracy(clf, train.images, train.labels), accuracy(clf, test.images, test.labels)
    print(
        f"classifier trained in {time.perf_counter() - t0:.1f}s: train accuracy {train_acc:.4f}, "
        f"held-out accuracy {test_acc:.4f}; saved to {folder}"
    )
    return 0


def main(args: argparse.Namespace) -> int:
    set_threads(args)
    if args.train_classifier:
        return _train_classifier(args.train_classifier)
    from service.sampling.errors import InputError
    from service.training.evaluate import parse_cache_arg, run_eval, write_plot

    try:
        folder = resolve_model(args.model)
        samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
        nfes = [int(v) for v in args.nfe.split(",")]
        result = run_eval(
            folder,
            samplers,
            args.schedule,
            nfes,
            args.n,
            args.cfg_scale,
            args.seed,
            Path(args.classifier) if args.classifier else None,
            log=print,
            caches=parse_cache_arg(args.cache) if args.cache else None,
        )
    except InputError as e:
        print(f"kdiff eval: error: {e.field}: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        print(f"kdiff eval: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        write_plot(result, Path(args.plot))
        print(f"plot written to {args.plot}")
    return 0

"""`kdiff train`: train a UNet denoiser on the bundled digits or on a folder of images."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from service.cli_args import add_threads, from_args, set_threads
from service.training.densities import DENSITIES

# The shipped default (model_store/digits): small enough to train on 2 CPU cores within an hour.
DIGITS_MODEL = {
    "in_channels": 1,
    "image_size": 16,
    "widths": [32, 64, 64],
    "depths": [1, 2, 2],
    "self_attn": [False, False, True],
    "mapping_dim": 128,
    "groups": 8,
    "num_classes": 10,
    "sigma_data": 0.5,
    "sigma_min": 0.01,
    "sigma_max": 20.0,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset", default="digits", help="'digits' or a folder of images (sub-folders = classes)"
    )
    p.add_argument(
        "--out", default="runs/digits", help="output folder (checkpoints, samples, exported model)"
    )
    p.add_argument(
        "--model-config", help="UNet config JSON file (default: the digits preset); unknown keys fail"
    )
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm (0 = off)")
    p.add_argument("--ema-power", type=float, default=2 / 3)
    p.add_argument("--ema-max", type=float, default=0.9999)
    p.add_argument("--sigma-density", default="log-normal", choices=sorted(DENSITIES))
    p.add_argument(
        "--density-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="density option, e.g. loc=-1.2 (repeatable)",
    )
    p.add_argument("--weighting", default="karras", choices=["karras", "soft-min-snr", "snr"])
    p.add_argument("--cond-dropout", type=float, default=0.1, help="class-label dropout for CFG")
    p.add_argument("--augment", default="none", choices=["none", "hflip", "karras"])
    p.add_argument("--aug-prob", type=float, default=0.12)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    add_threads(p)
    p.add_argument("--checkpoint-every", type=int, default=1000)
    p.add_argument(
        "--sample-every", type=int, default=0, help="write a sample grid every N steps (0 = at end)"
    )
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop and save after this wall time")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--lora-rank", type=int, default=0, help="train a LoRA of this rank on --init instead of a model"
    )
    p.add_argument("--init", help="LoRA: the model folder to adapt (e.g. model_store/digits)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    p.add_argument("--lora-classes", default="", help="LoRA: train on these labels only (e.g. 7 or 1,7)")


def _density_options(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--density-option needs KEY=VALUE, got {item!r}")
        out[key] = float(value)
    return out


def main(args: argparse.Namespace) -> int:
    set_threads(args)
    if args.lora_rank:
        return _main_lora(args)

    from service.models.unet import UNetConfig
    from service.training.datasets import DatasetError, load_dataset
    from service.training.trainer import TrainConfig, Trainer, TrainingError

    try:
        raw = json.loads(Path(args.model_config).read_text()) if args.model_config else dict(DIGITS_MODEL)
        if args.gradient_checkpointing:
            raw["gradient_checkpointing"] = True
        mc = UNetConfig.from_dict(raw)
        tc = from_args(TrainConfig, args, density_options=_density_options(args.density_option))
        data = load_dataset(args.dataset, mc.image_size, mc.in_channels, split="train")
        trainer = Trainer(mc, tc, data)
        if args.resume:
            trainer.resume()
            print(f"resumed {args.out} at step {trainer.step}", file=sys.stderr)
        losses = trainer.train(progress=not args.no_progress)
    except (ValueError, DatasetError, FileNotFoundError, TrainingError) as e:
        print(f"kdiff train: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    tail = losses[-100:]
    print(
        f"done: step {trainer.step} in {trainer.train_seconds / 60:.1f} min of training, "
        f"last-{len(tail)}-step mean loss {sum(tail) / max(1, len(tail)):.4f}; model written to {args.out}"
    )
    return 0


def _main_lora(args: argparse.Namespace) -> int:
    """``--lora-rank R --init FOLDER``: a LoRA file for a served model (its loras/ folder by default)."""
    import torch

    from service.models.unet import UNetConfig
    from service.training.datasets import DatasetError, load_dataset
    from service.training.lora_train import LoraTrainConfig, train_lora

    if not args.init:
        print("kdiff train: error: --lora-rank needs --init <model folder>", file=sys.stderr)
        return 2
    init = Path(args.init)
    out = Path(args.out) if args.out.endswith(".safetensors") else init / "loras" / "lora.safetensors"
    try:
        mc = UNetConfig.load(init / "config.json")
        data = load_dataset(args.dataset, mc.image_size, mc.in_channels, split="train")
        if args.lora_classes:
            keep = torch.tensor([int(c) for c in args.lora_classes.split(",")])
            mask = torch.isin(data.labels, keep)
            data = type(data)(data.images[mask], data.labels[mask], data.num_classes)
        cfg = from_args(LoraTrainConfig, args, init=init, out=out, rank=args.lora_rank, alpha=args.lora_alpha)
        path, losses = train_lora(cfg, data, log=lambda m: print(m, file=sys.stderr))
    except (ValueError, DatasetError, FileNotFoundError) as e:
        print(f"kdiff train: error: {e}", file=sys.stderr)
        return 1
    print(f"done: LoRA rank {args.lora_rank} on {len(data)} images, {len(losses)} steps; written to {path}")
    return 0

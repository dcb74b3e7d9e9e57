"""Training throughput of the default digits UNet: fp32 vs bf16 autocast, gradient checkpointing
on/off, peak memory. Each setting runs in its own subprocess (clean peak-memory numbers), and the
settings are interleaved over ``--rounds`` so the shared machine's load hits them alike.

    python bench/bench_training.py --steps 10 --rounds 2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

SETTINGS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def worker(args: argparse.Namespace) -> None:
    import resource

    import torch

    from service.models.unet import UNetConfig
    from service.training.cli import DIGITS_MODEL
    from service.training.datasets import digits
    from service.training.trainer import TrainConfig, Trainer

    torch.set_num_threads(args.threads)
    mc = UNetConfig.from_dict({**DIGITS_MODEL, "gradient_checkpointing": args.ckpt})
    tc = TrainConfig(
        out="/tmp/bench_training",
        batch_size=args.batch_size,
        precision=args.precision,
        device=args.device,
        checkpoint_every=0,
    )
    trainer = Trainer(mc, tc, digits("train", mc.image_size), log=lambda s: None)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(args.warmup):
        trainer.train_step()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step()  # .item() on the loss syncs each step
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = {
        "precision": args.precision,
        "checkpointing": args.ckpt,
        "it_s": args.steps / secs,
        "peak_rss_mib": peak / 1024,
        "train_rss_growth_mib": (peak - rss_before) / 1024,
    }
    if args.device.startswith("cuda"):
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    results: dict[tuple[str, bool], list[dict]] = {s: [] for s in SETTINGS}
    for _ in range(args.rounds):
        for precision, ckpt in SETTINGS:
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                "--precision",
                precision,
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--batch-size",
                str(args.batch_size),
                "--threads",
                str(args.threads),
                "--device",
                args.device,
            ] + (["--ckpt"] if ckpt else [])
            line = (
                subprocess.run(cmd, check=True, capture_output=True, text=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            results[(precision, ckpt)].append(json.loads(line))
    print(
        f"batch {args.batch_size}, {args.steps} timed steps x {args.rounds} rounds, {args.threads} threads, "
        f"{args.device}"
    )
    print(
        "| precision | grad. checkpointing | it/s (median) | samples/s | peak RSS (MiB) "
        "| RSS growth in training (MiB) |"
    )
    print("|---|---|---|---|---|---|")
    for (precision, ckpt), runs in results.items():
        its = sorted(r["it_s"] for r in runs)[len(runs) // 2]
        peak = max(r["peak_rss_mib"] for r in runs)
        growth = max(r["train_rss_growth_mib"] for r in runs)
        print(
            f"| {precision} | {'on' if ckpt else 'off'} | {its:.2f} | {its * args.batch_size:.0f} "
            f"| {peak:.0f} | {growth:.0f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r for runs in results.values() for r in runs], f, indent=2)


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    main()

"""`kdiff sample --model digits --class-label 7 -o seven.png`: sample a store model, write a PNG."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="digits", help="model name in the store")
    parser.add_argument("--model-store", default="model_store", help="model store folder")
    parser.add_argument("--class-label", type=int, help="class (class-conditional models)")
    parser.add_argument("--sampler", help="sampler name (default: the model's)")
    parser.add_argument("--schedule", help="schedule name (default: the model's)")
    parser.add_argument("--steps", type=int, help="steps (default: the model's)")
    parser.add_argument("--cfg-scale", type=float, help="guidance scale (default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image (image i: seed+i)")
    parser.add_argument("-n", type=int, default=1, help="number of images (a grid when > 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("-o", "--output", default="sample.png", help="output PNG")


def main(args: argparse.Namespace) -> int:
    try:
        return _sample(args)
    except ValueError as exc:  # unknown names, bad options, a model that cannot load: one line, no traceback
        raise SystemExit(f"kdiff sample: error: {exc}") from exc


def _sample(args: argparse.Namespace) -> int:
    import torch

    from service.images import encode_images, grid_png
    from service.models.store import ModelStore
    from service.sampling.ksampler import KSampler, sampling_dtype

    model = ModelStore(args.model_store).load(args.model, args.device)
    d = model.manifest.defaults
    sampler = args.sampler or d.get("sampler", "dpmpp_2m")
    schedule = args.schedule or d.get("schedule", "karras")
    steps = args.steps if args.steps is not None else int(d.get("steps", 20))
    cfg = args.cfg_scale if args.cfg_scale is not None else float(d.get("cfg_scale", 1.0))
    seeds = [args.seed + i for i in range(args.n)]
    cond = None
    if args.class_label is not None:
        if model.conditioning != "class" or not 0 <= args.class_label < model.num_classes:
            raise SystemExit(f"--class-label must be in [0, {model.num_classes - 1}] for {args.model}")
        cond = torch.full([args.n], args.class_label, dtype=torch.long)
    elif model.conditioning == "class":
        cond = torch.full([args.n], model.num_classes, dtype=torch.long)
        cfg = 1.0
    ks = KSampler(model.denoiser, sampler, schedule)
    with torch.inference_mode():
        x = ks.sample(
            shape=(args.n, *model.latent_shape),
            steps=steps,
            seed=seeds,
            condition=cond,
            cfg_scale=cfg,
            device=model.device,
            dtype=sampling_dtype(model.dtype),
        )
        images = x if model.decode is None else model.decode(x)
    params = {
        "model": args.model,
        "sampler": sampler,
        "schedule": schedule,
        "steps": steps,
        "cfg_scale": cfg,
        "class_label": args.class_label,
        "seeds": seeds,
    }
    pngs = encode_images(images.float().cpu(), params, seeds)
    Path(args.output).write_bytes(grid_png(pngs, params))
    print(f"wrote {args.output} ({args.n} image(s), {sampler}/{schedule}, {steps} steps, seeds {seeds})")
    return 0

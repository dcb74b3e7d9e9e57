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
    from service.sampling.driver import Driver, drive
    from service.sampling.request import Limits, build_spec, spec_parameters
    from service.sampling.spec import sampling_dtype

    model = ModelStore(args.model_store).load(args.model, args.device)
    d = model.manifest.defaults
    # the same spec building as the HTTP API: names, aliases, option checks, seeds (image i: seed+i)
    wanted = argparse.Namespace(
        sampler=args.sampler, schedule=args.schedule, steps=args.steps, seed=args.seed
    )
    wanted.n = args.n
    spec, n = build_spec(wanted, d, Limits(), getattr(model.denoiser, "sigmas", None) is not None)
    cfg = args.cfg_scale if args.cfg_scale is not None else float(d.get("cfg_scale", 1.0))
    cond: dict[str, torch.Tensor] = {}
    uncond = None
    if args.class_label is not None:
        if model.conditioning != "class" or not 0 <= args.class_label < model.num_classes:
            raise SystemExit(f"--class-label must be in [0, {model.num_classes - 1}] for {args.model}")
        cond, uncond = model.class_conditioning(torch.full([n], args.class_label, dtype=torch.long))
    elif model.conditioning == "class":  # unconditional: the null class, nothing to guide against
        cond = {"class_cond": torch.full([n], model.num_classes, dtype=torch.long)}
        cfg = 1.0
    with torch.inference_mode():
        driver = Driver.start(
            spec,
            model.denoiser,
            (n, *model.latent_shape),
            cond=cond,
            uncond=uncond,
            cfg_scale=cfg,
            device=model.device,
            dtype=sampling_dtype(model.dtype),
        )
        x = drive(driver, model.denoiser)
        images = x if model.decode is None else model.decode(x)
    params = {"model": args.model, **spec_parameters(spec), "cfg_scale": cfg, "class_label": args.class_label}
    pngs = encode_images(images.float().cpu(), params, spec.seeds)
    Path(args.output).write_bytes(grid_png(pngs, params))
    print(
        f"wrote {args.output} ({n} image(s), {spec.sampler}/{params['schedule']}, {spec.steps} steps, "
        f"seeds {spec.seeds})"
    )
    return 0

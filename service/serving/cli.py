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


ARGUMENTS = ("model", "sampler", "schedule", "steps", "seed", "n", "cfg_scale", "class_label")  # = fields


def main(args: argparse.Namespace) -> int:
    from service.sampling.errors import InputError

    try:
        return _sample(args)
    except InputError as exc:  # the field as its option: "--class-label must be in [0, 9] ..."
        option = "--" + exc.field.replace("_", "-")
        text = option + exc.message[len(exc.field) :] if exc.message.startswith(exc.field) else exc.message
        raise SystemExit(f"kdiff sample: error: {text}") from exc
    except ValueError as exc:  # unknown names, a model that cannot load: one line, no traceback
        raise SystemExit(f"kdiff sample: error: {exc}") from exc


def _sample(args: argparse.Namespace) -> int:
    """The same path as a served request: a GenerationRequest, ``build_job`` (spec, the model family's
    inputs, the driver), then the driver run here, one model call per evaluation."""
    import torch

    from service.images import encode_images, grid_png
    from service.models.store import ModelStore
    from service.sampling.driver import drive
    from service.sampling.request import Limits

    from .request import GenerationRequest, build_job

    model = ModelStore(args.model_store).load(args.model, args.device)
    request = GenerationRequest(**{name: getattr(args, name) for name in ARGUMENTS})
    with torch.inference_mode():
        job = build_job(request, model, Limits(), float("inf"))
        assert job.driver is not None
        x = drive(job.driver, model.denoiser)
        images = x if model.decode is None else model.decode(x)
    params = dict(job.parameters)
    seeds = params.pop("seeds")
    pngs = encode_images(images.float().cpu(), params, seeds)
    Path(args.output).write_bytes(grid_png(pngs, params))
    print(
        f"wrote {args.output} ({job.n} image(s), {job.spec.sampler}/{params['schedule']}, "
        f"{job.spec.steps} steps, seeds {seeds})"
    )
    return 0

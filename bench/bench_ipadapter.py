"""IP-Adapter images of 4 requests in one shared UNet call, versus each request in its own call.

An SD1.5-shaped UNet (bench_lora's: diffusers' UNet2DConditionModel with SD1.5's blocks, 16
cross-attention layers, 768-wide context; widths scaled by ``--width`` / 320) and two adapters in
h94's file layout for it (random weights, loaded through service.models.ipadapter): A plain (4 image
tokens), B plus (16 tokens, the Resampler). 4 requests with classifier-free guidance (2 rows each): no
adapter, A, B, A + B. Timed, interleaved, ``--repeats`` times, one denoiser evaluation each:

- mixed: one call of the 8 rows (each cross-attention: one image attention per adapter over its rows);
- separate: 4 calls of 2 rows.

    python bench/bench_ipadapter.py --threads 1                                  # CPU: width 64
    python bench/bench_ipadapter.py --device cuda --width 320 --latent 64 --dtype float16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_lora import sync, unet  # noqa: E402
from service.models.ipadapter import ImageAdapters  # noqa: E402
from service.models.ipadapter.adapters import PreparedImage  # noqa: E402
from service.models.sd_unet import SDUNet  # noqa: E402
from tests.support.ipadapter_tiny import ip_layers, plain_proj, plus_proj, save_adapter, save_encoder  # noqa: E402

OPTIONS = {"width": 64, "latent": 16, "repeats": 5, "threads": 1, "device": "cpu", "dtype": "float32"}


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in OPTIONS.items():
        ap.add_argument(f"--{name}", type=type(default), default=default)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = unet(args.width, args.latent)
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ipadapter"
        save_encoder(folder / "image_encoder", 32, 24, seed=1)
        save_adapter(folder / "a.safetensors", plain_proj(24, 768, g), ip_layers(model, g))
        save_adapter(folder / "b.safetensors", plus_proj(32, 768, g), ip_layers(model, g))
        wrapped = SDUNet(model.to(device, dtype))
        images = ImageAdapters(Path(tmp), model, device, dtype, "bench")
        wrapped.images = images
        a, b = images.resolve("a", "a"), images.resolve("b", "b")

    def image(aid: int) -> PreparedImage:
        tokens = torch.randn(images.adapters[aid].tokens, 768, generator=g).to(device, dtype)
        return PreparedImage(aid, 1.0, tokens, tokens)

    requests = [[], [image(a)], [image(b)], [image(a), image(b)]]
    per_request = [images.rows(r, 2, uncond=False) for r in requests]
    cond = {k: torch.cat([r[k] for r in per_request]).to(device) for k in per_request[0]}
    x = torch.randn(8, 4, args.latent, args.latent, generator=g).to(device, dtype)
    ctx = torch.randn(8, 77, 768, generator=g).to(device, dtype)
    t = torch.full([8], 500.0, device=device)

    def call(rows: slice, with_images: bool = True) -> torch.Tensor:
        with torch.inference_mode():
            extra = {k: v[rows] for k, v in cond.items()} if with_images else {}
            return wrapped(x[rows], t[rows], ctx[rows], **extra)  # type: ignore[no-any-return]

    variants: dict[str, Callable[[], torch.Tensor]] = {
        "mixed": lambda: call(slice(0, 8)),
        "separate": lambda: torch.cat([call(slice(i, i + 2)) for i in range(0, 8, 2)]),
        "plain": lambda: call(slice(0, 8), with_images=False),  # what the images cost
    }
    outs = {name: fn() for name, fn in variants.items()}  # warm-up, and the outputs to compare
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            samples[name].append(timed(fn, device))
    med = {
        name: [statistics.median(col) for col in zip(*runs, strict=True)] for name, runs in samples.items()
    }
    labels = {
        "mixed": ("mixed: 8 rows (none, A, B, A+B), one call", 1),
        "separate": ("separate: 4 x 2 rows", 4),
        "plain": ("8 rows, no adapter", 1),
    }
    table = [
        f"| {label} | {calls} | {med[k][0]:.3f} | {med[k][1]:.3f} |" for k, (label, calls) in labels.items()
    ]
    head = f"SD1.5-shaped UNet width {args.width}, latent {args.latent}x{args.latent}, {args.dtype}, {device}"
    print(
        "\n".join(
            [head, "| variant | UNet calls | median wall s | median CPU s |", "|---|---|---|---|", *table]
        )
    )
    ratio, cpu_ratio = (m / s for m, s in zip(med["mixed"], med["separate"], strict=True))
    err = float((outs["mixed"] - outs["separate"]).abs().max())
    print(f"mixed / separate = {ratio:.2f} wall, {cpu_ratio:.2f} CPU; max |mixed - separate| = {err:.2g}")


if __name__ == "__main__":
    main()

"""Per-row LoRA in one shared UNet call, versus the same rows without LoRA, versus separate calls with
merged weights.

An SD1.5-shaped UNet (diffusers' UNet2DConditionModel: SD1.5's blocks, layers and heads; widths scaled
by ``--width`` / 320 so that it fits a CPU), random weights, ``--rows`` rows in ``--groups`` groups,
each group with its own random rank-``--rank`` LoRA on every attention, feed-forward and proj layer
(kohya's default targets). Timed, interleaved, ``--repeats`` times:

- base: one call of all rows, no LoRA (the adapter hooks installed, inactive);
- mixed: one call of all rows, each group adding its own LoRA per row (service.models.lora);
- merged: per group, merge its LoRA into the weights, call its rows, unmerge (merge/unmerge timed).

    python bench/bench_lora.py --threads 1                        # CPU: width 128, 8x8 latents
    python bench/bench_lora.py --device cuda --width 320 --latent 64 --dtype float16   # SD1.5 size
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.models.lora import LoraIndex, ModelAdapters  # noqa: E402
from tests.support.lora_files import kohya_state, random_layers, save  # noqa: E402


def transformer_linears(name: str, m: torch.nn.Module) -> bool:
    keys = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
    return isinstance(m, torch.nn.Linear | torch.nn.Conv2d) and name.endswith(keys)


def unet(width: int, latent: int) -> Any:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=latent,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(width, 2 * width, 4 * width, 4 * width),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=128, help="first block width (SD1.5: 320)")
    ap.add_argument("--latent", type=int, default=8, help="latent side (SD1.5 at 512 px: 64)")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = unet(args.width, args.latent).to(device, dtype)
    root = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    names = [f"l{i}" for i in range(args.groups)]
    raw = []
    for i, name in enumerate(names):
        layers = random_layers(model, args.rank, seed=i, select=transformer_linears)
        raw.append(layers)
        save(kohya_state({"unet": layers}, alpha=args.rank / 2), root / "loras" / f"{name}.safetensors")
    adapters = ModelAdapters("bench", LoraIndex(root), model, {})
    ids = [adapters.resolve([(n, 1.0)]) for n in names]
    per = args.rows // args.groups
    rows = torch.cat([adapters.encode(r, per) for r in ids])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, 4, args.latent, args.latent, generator=g).to(device, dtype)
    t = torch.full((args.rows,), 500.0, device=device)
    ctx = torch.randn(args.rows, 77, 768, generator=g).to(device, dtype)
    modules = dict(model.named_modules())

    def base() -> Any:
        return model(x, t, encoder_hidden_states=ctx).sample

    def mixed() -> Any:
        with adapters.call(rows):
            return model(x, t, encoder_hidden_states=ctx).sample

    def merge(layers: dict[str, Any], sign: float) -> None:
        for name, (down, up) in layers.items():
            w = modules[name].weight
            delta = (
                up.flatten(1).to(device, torch.float32) @ down.flatten(1).to(device, torch.float32)
            ) * 0.5
            w.add_((sign * delta).view(w.shape).to(dtype))

    def merged() -> Any:
        outs = []
        for i, layers in enumerate(raw):
            part = slice(i * per, (i + 1) * per)
            merge(layers, 1.0)
            outs.append(model(x[part], t[part], encoder_hidden_states=ctx[part]).sample)
            merge(layers, -1.0)
        return torch.cat(outs)

    with torch.inference_mode():
        want, got = merged(), mixed()
        err = (want.float() - got.float()).abs().max().item()
        times: dict[str, list[float]] = {"base": [], "mixed": [], "merged": []}
        for fn in (base, mixed, merged):
            fn()  # warm-up
        for _ in range(args.repeats):
            for name, fn in (("base", base), ("mixed", mixed), ("merged", merged)):
                times[name].append(timed(fn, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu, {torch.get_num_threads()} threads"
    )
    print(f"device: {where}; dtype {args.dtype}; width {args.width}; latent {args.latent}x{args.latent}; "
          f"{args.rows} rows, {args.groups} LoRAs of rank {args.rank}; median of {args.repeats}")  # fmt: skip
    print(f"mixed vs merged output: max |diff| {err:.2e}")
    print("| variant | median s | vs base |")
    print("|---|---|---|")
    for k in ("base", "mixed", "merged"):
        print(f"| {k} | {med[k]:.4f} | {med[k] / med['base']:.2f}x |")
    print(
        f"mixed / base = {med['mixed'] / med['base']:.3f}; "
        f"mixed / merged = {med['mixed'] / med['merged']:.3f}"
    )


if __name__ == "__main__":
    main()

"""ControlNet units of 4 requests in one shared UNet call, versus each request in its own call.

An SD1.5-shaped UNet (diffusers' UNet2DConditionModel with SD1.5's blocks, 2 layers per block, 8
heads, 768-wide context; widths scaled by ``--width`` / 320 so that it fits a CPU) and two
ControlNets of its shape (random weights, loaded through service.models.controlnet from diffusers
folders). 4 requests with classifier-free guidance (2 rows each): no unit, ControlNet A, ControlNet B,
A + B. Timed, interleaved, ``--repeats`` times, one denoiser evaluation each:

- mixed: one call of the 8 rows (one ControlNet call per ControlNet: A on 4 rows, B on 4 rows);
- separate: 4 calls of 2 rows (each request with its own ControlNet calls: 4 ControlNet calls).

    python bench/bench_controlnet.py --threads 1                                  # CPU: width 64
    python bench/bench_controlnet.py --device cuda --width 320 --latent 64 --dtype float16

``--union``: ControlNet-Union instead (an SDXL-shaped UNet: 3 levels, 1 / 2 / 10 transformer layers,
64 channels a head, 2048-wide context, text_time; one ProMax-shaped ControlNetUnionModel of its
shape): no unit, union canny, union depth, union openpose + tile (two images); mixed is one union
call for the 6 (row, unit) items, separate one union call per request.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_lora import sync, unet  # noqa: E402
from service.models.controlnet import ControlSet  # noqa: E402
from service.models.controlnet.units import PreparedUnit  # noqa: E402
from service.models.sd_unet import SDUNet  # noqa: E402


def controlnets(root: Path, model: Any) -> None:
    from diffusers import ControlNetModel

    for i, name in enumerate(("a", "b")):
        torch.manual_seed(10 + i)
        net = ControlNetModel.from_unet(model, load_weights_from_unet=False)
        with torch.no_grad():
            for key, p in net.named_parameters():
                if "controlnet_down" in key or "controlnet_mid" in key or "cond_embedding.conv_out" in key:
                    p.normal_(0, 0.02)
        net.save_pretrained(str(root / "controlnet" / name))


def sdxl_unet(width: int, latent: int) -> Any:
    """An SDXL-shaped UNet (SDXL's blocks and depths, widths scaled by ``width`` / 320)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=latent,
        layers_per_block=2,
        block_out_channels=(width, 2 * width, 4 * width),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(max(1, width // 64), max(1, width // 32), max(1, width // 16)),
        use_linear_projection=True,
        cross_attention_dim=2048,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=1280 + 6 * 256,
    ).eval()


def union(root: Path, model: Any) -> None:
    """A ProMax-shaped (8 types) ControlNetUnionModel of the UNet's shape, random weights."""
    from diffusers import ControlNetUnionModel

    keys = ("block_out_channels", "down_block_types", "transformer_layers_per_block", "attention_head_dim")
    keys += ("use_linear_projection", "cross_attention_dim", "addition_embed_type", "addition_time_embed_dim")
    keys += ("projection_class_embeddings_input_dim",)
    c0 = model.config.block_out_channels[0]
    torch.manual_seed(12)
    net = ControlNetUnionModel(
        **{k: model.config[k] for k in keys}, num_control_type=8, num_trans_channel=c0, num_proj_channel=c0
    )
    net.save_pretrained(str(root / "controlnet" / "union"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--latent", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--union", action="store_true", help="ControlNet-Union on an SDXL-shaped UNet")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = (sdxl_unet if args.union else unet)(args.width, args.latent)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (union if args.union else controlnets)(root, model)
        wrapped = SDUNet(model.to(device, dtype))
        controls = ControlSet(root, model.config, device, dtype, "bench")
        wrapped.controls = controls
        ids = [controls.resolve(n, n) for n in (("union",) if args.union else ("a", "b"))]
    size = args.latent * 8
    g = torch.Generator().manual_seed(0)

    def unit(net: int, kind: int = -1, group: int = -1) -> PreparedUnit:
        hint = torch.randint(0, 256, (4, size, size), dtype=torch.uint8, generator=g)
        hint[3] = 255
        return PreparedUnit(net, 1.0, 0.0, 1.0, 0, hint, kind, group)

    if args.union:  # none, canny, depth, openpose + tile (one unit, two images)
        u = ids[0]
        requests = [[], [unit(u, 3, 0)], [unit(u, 1, 0)], [unit(u, 0, 0), unit(u, 6, 0)]]
    else:
        requests = [[], [unit(ids[0])], [unit(ids[1])], [unit(ids[0]), unit(ids[1])]]
    rows = [controls.rows(r, 2, size, size, uncond=False) for r in requests]
    x = torch.randn(8, 4, args.latent, args.latent, generator=g).to(device, dtype)
    t = torch.full([8], 500.0, device=device)
    ctx = torch.randn(8, 77, 2048 if args.union else 768, generator=g).to(device, dtype)
    cond = {k: torch.cat([r[k] for r in rows]).to(device) for k in rows[0]}
    if args.union:  # SDXL's pooled text and size ids
        cond["y"] = torch.randn(8, 1280, generator=g).to(device, dtype)
        cond["time_ids"] = torch.tensor([[8.0 * size, 8.0 * size, 0, 0, 8.0 * size, 8.0 * size]] * 8).to(
            device
        )
    calls: list[int] = []
    for net in controls.nets:  # the union's items pass its type embedding once per call
        hooked = getattr(net, "control_add_embedding", net)
        hooked.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))

    @torch.inference_mode()
    def mixed() -> torch.Tensor:
        return wrapped(x, t, ctx, **cond)

    @torch.inference_mode()
    def separate() -> torch.Tensor:
        parts = [slice(2 * i, 2 * i + 2) for i in range(4)]
        return torch.cat([wrapped(x[p], t[p], ctx[p], **{k: v[p] for k, v in cond.items()}) for p in parts])

    variants = {"mixed": mixed, "separate": separate}
    outs = {name: fn() for name, fn in variants.items()}  # warm-up, and the outputs to compare
    counts = {}
    for name, fn in variants.items():
        calls.clear()
        fn()
        counts[name] = list(calls)
    # wall time, and the process's CPU time (steadier on a machine other jobs share)
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    shape = "SDXL-shaped UNet + ControlNet-Union" if args.union else "SD1.5-shaped UNet"
    print(f"{shape} width {args.width}, latent {args.latent}x{args.latent}, {args.dtype}, {device}")
    print("| variant | UNet calls | ControlNet calls (rows) | median wall s | median CPU s |")
    print("|---|---|---|---|---|")
    for name, label, unet_calls in (
        ("mixed", "mixed: 8 rows, one call", 1),
        ("separate", "separate: 4 x 2 rows", 4),
    ):
        row = f"| {label} | {unet_calls} | {len(counts[name])} {counts[name]} | {med[name]:.3f} |"
        print(f"{row} {med_cpu[name]:.3f} |")
    print(
        f"mixed / separate = {med['mixed'] / med['separate']:.2f} wall, "
        f"{med_cpu['mixed'] / med_cpu['separate']:.2f} CPU; "
        f"max |mixed - separate| = {float((outs['mixed'] - outs['separate']).abs().max()):.2g}"
    )


if __name__ == "__main__":
    main()

"""Flux ControlNet units of 4 requests in one shared transformer call, versus each request alone.

A Flux-shaped transformer (FLUX.1's 19 double and 38 single blocks; width ``--heads`` x 32 so that
it fits a CPU) and two ControlNets of its shape (random weights, diffusers folders loaded through
service.models.controlnet.flux_units): A InstantX-canny-shaped (5 double + 10 single blocks), B with
2 double blocks. 4 requests (Flux: no CFG, one row each): no unit, A, B, A + B. Timed, interleaved,
``--repeats`` times, one velocity evaluation each:

- mixed: one call of the 4 rows (one ControlNet call per ControlNet: A on 2 rows, B on 2 rows);
- separate: 4 calls of 1 row (each request with its own ControlNet calls: 4 ControlNet calls).

    python bench/bench_flux_controlnet.py --threads 1
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
from service.models.controlnet.flux_units import FluxControlSet, FluxUnit  # noqa: E402
from service.models.flow_nets import FluxVelocity  # noqa: E402


def build(root: Path, heads: int) -> tuple[FluxVelocity, FluxControlSet]:
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    common: dict[str, Any] = {
        "in_channels": 64,
        "attention_head_dim": 32,
        "num_attention_heads": heads,
        "joint_attention_dim": 256,
        "pooled_projection_dim": 64,
        "guidance_embeds": True,
        "axes_dims_rope": (4, 14, 14),
    }
    torch.manual_seed(0)
    tr = FluxTransformer2DModel(num_layers=19, num_single_layers=38, **common).eval()
    for name, (d, s) in {"A": (5, 10), "B": (2, 0)}.items():
        net = FluxControlNetModel(num_layers=d, num_single_layers=s, **common)
        with torch.no_grad():
            for k, p in net.named_parameters():
                if k.startswith(("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder")):
                    p.normal_(0, 0.05)
        net.save_pretrained(str(root / "controlnet" / name), safe_serialization=True)
    velocity = FluxVelocity(tr)
    controls = FluxControlSet(root, tr, lambda x: x, torch.device("cpu"), torch.float32, "bench", 3.5)
    velocity.controls = controls
    return velocity, controls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4, help="attention heads of 32 channels (FLUX.1: 24 of 128)")
    ap.add_argument("--latent", type=int, default=32, help="latent side (32: 256 tokens, a 256 px image)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        velocity, controls = build(Path(tmp), args.heads)
        a, b = controls.resolve("A", "bench"), controls.resolve("B", "bench")
        side, text = args.latent, 32
        tokens = (side // 2) ** 2
        g = torch.Generator().manual_seed(1)

        def unit(net: int) -> FluxUnit:
            return FluxUnit(net, 0.8, 0.0, 1.0, -1, torch.randn(tokens, 64, generator=g))

        requests = [[], [unit(a)], [unit(b)], [unit(a), unit(b)]]
        rows = [controls.flux_rows(u, 1, (tokens, 64)) for u in requests]
        cond = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
        cond |= {
            "context": torch.randn(4, text, 256, generator=g),
            "pooled": torch.randn(4, 64, generator=g),
            "guidance": torch.full([4], 3.5),
        }
        x, t = torch.randn(4, 16, side, side, generator=g), torch.full([4], 0.7)
        calls: list[int] = []
        for net in controls.nets:
            net.register_forward_hook(lambda m, i, o: calls.append(int(i[0].shape[0])))

        def mixed() -> torch.Tensor:
            return velocity(x, t, **cond)

        def separate() -> torch.Tensor:
            return torch.cat(
                [
                    velocity(x[i : i + 1], t[i : i + 1], **{k: v[i : i + 1] for k, v in cond.items()})
                    for i in range(4)
                ]
            )

        times: dict[str, list[tuple[float, float]]] = {"mixed": [], "separate": []}
        seen: dict[str, list[int]] = {}
        with torch.inference_mode():
            outs = {"mixed": mixed(), "separate": separate()}  # warm-up
            for _ in range(args.repeats):
                for name, fn in (("mixed", mixed), ("separate", separate)):
                    calls.clear()
                    w, c = time.perf_counter(), time.process_time()
                    fn()
                    times[name].append((time.perf_counter() - w, time.process_time() - c))
                    seen[name] = list(calls)
        gap = float((outs["mixed"] - outs["separate"]).abs().max())
        print("| variant | transformer calls | ControlNet calls (rows) | median wall s | median CPU s |")
        print("|---|---|---|---|---|")
        for name, n in (("mixed: 4 rows, one call", 1), ("separate: 4 x 1 row", 4)):
            key = name.split(":")[0]
            wall = statistics.median(w for w, _ in times[key])
            cpu = statistics.median(c for _, c in times[key])
            rows_s = ", ".join(str(r) for r in seen[key])
            print(f"| {name} | {n} | {len(seen[key])} ({rows_s}) | {wall:.3f} | {cpu:.3f} |")
        ratio = statistics.median(w for w, _ in times["mixed"]) / statistics.median(
            w for w, _ in times["separate"]
        )
        cpu_ratio = statistics.median(c for _, c in times["mixed"]) / statistics.median(
            c for _, c in times["separate"]
        )
        print(f"mixed / separate: {ratio:.2f} wall, {cpu_ratio:.2f} CPU; outputs agree to {gap:.2g}")


if __name__ == "__main__":
    main()

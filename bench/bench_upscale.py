"""Tiled upscaling: time and peak memory of one image by tile size, on random-weight files with the
published models' layouts (realesr-general-x4v3's compact net; RRDB_ESRGAN_x4's 23-block RRDBNet; ``hat1``:
HAT's widths (embed 180, 6 heads, window 16) with one residual group of two blocks, to see the window
attention's memory without HAT-L's CPU time; ``--attn-scores`` sets swin.ATTN_SCORES, 0 = no chunks).

    python bench/bench_upscale.py --model compact --size 512 --tiles 0,128,256 [--overlap 16] [--batch 4]

Each configuration runs in its own process: the model is loaded and warmed up on a 32 px image, then
one ``size`` x ``size`` image is upscaled 4x through ``Upscalers.upscale`` (the routes' path: tiles,
the batching thread). Peak RSS is the process's high-water mark (ru_maxrss) during that upscale minus
the mark after warm-up (model, torch and the warm-up already in); the input and the float32 output
image (size^2 x 16 x 12 bytes) are part of the peak.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def child(args: argparse.Namespace) -> None:
    import torch

    from service.models.upscalers import UpscalerConfig, Upscalers
    from tests.support import upscaler_files as uf

    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp())
    if args.model == "hat1":
        from service.models.upscalers import swin
        from tests.support import upscaler_files_swin as us

        swin.ATTN_SCORES = args.attn_scores or 1 << 60
        state = us.hat(us.Dims(180, (2,), 6, 16), scale=4)
    else:
        state = uf.compact(num_conv=32) if args.model == "compact" else uf.esrgan_old(nb=23)
    uf.write(folder / "m.safetensors", state)
    del state
    ups = Upscalers(folder, UpscalerConfig(tile=args.tile, overlap=args.overlap, batch=args.batch))
    ups.upscale(torch.rand(1, 3, 32, 32), "m", scale=4)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    x = torch.rand(1, 3, args.size, args.size)
    t0 = time.perf_counter()
    y = ups.upscale(x, "m", scale=4)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stats = ups.stats("m")
    print(json.dumps({
        "model": args.model, "attn_scores": args.attn_scores if args.model == "hat1" else None,
        "size": args.size, "tile": args.tile, "overlap": args.overlap,
        "batch": args.batch, "threads": args.threads, "seconds": round(seconds, 2),
        "peak_rss_over_loaded_mib": round(peak - base, 1), "output": list(y.shape),
        "model_calls": stats.calls if stats else None, "windows": stats.windows if stats else None,
    }))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["compact", "esrgan", "hat1"], default="compact")
    p.add_argument("--attn-scores", type=int, default=1 << 24, help="hat1: attention scores per chunk")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--tiles", default="0,128,256", help="comma-separated tile sizes (0 = untiled)")
    p.add_argument("--overlap", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tile", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    for tile in [int(t) for t in args.tiles.split(",")]:
        cmd = [sys.executable, __file__, "--child", "--tile", str(tile)]
        for k in ("model", "size", "overlap", "batch", "threads", "attn_scores"):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()

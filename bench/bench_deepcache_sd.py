"""DeepCache on an SD1.5-shaped UNet: one cached evaluation against one full evaluation, wall and FLOPs.

diffusers' UNet2DConditionModel with SD1.5's config (bench_sd_unet.SD15_UNET, random weights, built
here: nothing is downloaded) behind our SDUNet wrapper, batch 1, 512x512 (64x64 latents), a 77-token
768-wide context. A full evaluation is the plain forward; a cached one is a row with
``cache: {"method": "deepcache"}`` whose cache holds (interval 1000, after one full evaluation):
conv_in, the first down layer, the last up block's last two layers and the output run
(models/stepcache/sd_unet.py). Wall: ``--repeats`` evaluations of each, interleaved, median and best;
FLOPs: torch's FlopCounterMode over a full evaluation and over a cached one, on the meta
device (attention counted by its formula; on the CPU the fused attention kernel goes uncounted).
With ``--sdxl`` the SDXL-shaped UNet at 1024x1024 (128x128 latents) is counted too, FLOPs only.

With ``--controlnet`` an SD1.5-shaped ControlNet (random weights; one unit, weight 1, a 512x512
control image) joins every evaluation, and a cached evaluation is measured two ways: as before this
change (every ControlNet in full, its shallow residuals used: ``controls.staged(...).full()`` handed to the
split) and as now (the ControlNet up to its first down layer only: ``SDUNet`` with the unit). FLOPs
as above (the ControlNet's whole forward vs its ``start``); seconds as CPU time of this process
(``time.process_time``; with ``--threads 1`` it is the one thread's time, which other jobs on a
shared machine do not inflate as they do wall time).

    python bench/bench_deepcache_sd.py --threads 2 --repeats 5
    python bench/bench_deepcache_sd.py --threads 1 --repeats 3 --controlnet
    python bench/bench_deepcache_sd.py --levels   # FLOPs only, every split level

``--level L``: the split (the sd-webui extension's ``deepcache_cache_resnet_level``; default 1).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_sd_unet import SD15_UNET  # noqa: E402
from service.models.sd_unet import SDUNet  # noqa: E402
from service.models.stepcache import CacheSpec, cache_rows  # noqa: E402

SDXL_UNET: dict[str, Any] = SD15_UNET | {  # SDXL base's UNet config
    "sample_size": 128,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}


LEVEL = [1]  # the split (``--level``; stepcache/sd_unet.py)


def inputs(cfg: dict[str, Any], device: str) -> dict[str, torch.Tensor]:
    size = cfg["sample_size"]
    out = {
        "x": torch.randn(1, 4, size, size, device=device),
        "t": torch.full([1], 500.0, device=device),
        "context": torch.randn(1, 77, cfg["cross_attention_dim"], device=device),
    }
    if cfg.get("addition_embed_type") == "text_time":
        out["y"] = torch.randn(1, 1280, device=device)
        out["time_ids"] = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]], device=device)
    return out


def flops(net: SDUNet, kw: dict[str, torch.Tensor], cache: torch.Tensor | None) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        net(kw["x"], kw["t"], **{k: v for k, v in kw.items() if k not in ("x", "t")}, cache=cache)
    return int(counter.get_total_flops())


def build(cfg: dict[str, Any], device: str) -> SDUNet:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**cfg).eval()
    return SDUNet(unet)


@torch.inference_mode()
def count(cfg: dict[str, Any]) -> dict[str, float]:
    """GFLOPs of a full and of a cached evaluation, counted on the meta device (no weights, no time;
    attention counted by its formula, which the CPU's fused attention kernel is not)."""
    net = build(cfg, "meta")
    kw = inputs(cfg, "meta")
    full = flops(net, kw, None)
    rows = cache_rows(CacheSpec("deepcache", interval=1000, level=LEVEL[0]), 1)
    flops(net, kw, rows)  # the full evaluation the cached one reuses
    return {"full_gflop": full / 1e9, "cached_gflop": flops(net, kw, rows) / 1e9}


@torch.inference_mode()
def measure(cfg: dict[str, Any], repeats: int) -> dict[str, Any]:
    """Wall seconds of full and cached evaluations on the CPU (interleaved), median and best."""
    net = build(cfg, "cpu")
    kw = inputs(cfg, "cpu")
    rest = {k: v for k, v in kw.items() if k not in ("x", "t")}
    rows = cache_rows(CacheSpec("deepcache", interval=1000, level=LEVEL[0]), 1)
    net(kw["x"], kw["t"], **rest, cache=rows)  # the full evaluation the cached ones reuse
    times: dict[str, list[float]] = {"full": [], "cached": []}
    for _ in range(repeats):
        for name, cache in (("full", None), ("cached", rows)):
            t = time.perf_counter()
            net(kw["x"], kw["t"], **rest, cache=cache)
            times[name].append(time.perf_counter() - t)
    return {
        **{f"{k}_median_s": statistics.median(v) for k, v in times.items()},
        **{f"{k}_best_s": min(v) for k, v in times.items()},
    }


def controlled(net: SDUNet, device: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """An SD1.5-shaped ControlNet attached to ``net`` through a ControlSet, and one unit's rows."""
    from service.models.controlnet.net import ControlNet, ControlNetConfig
    from service.models.controlnet.units import ControlSet, PreparedUnit

    torch.manual_seed(1)
    with torch.device(device):
        cn = ControlNet(ControlNetConfig(cross_attention_dim=768)).eval()
    controls = ControlSet(Path("."), net.unet.config, torch.device(device), torch.float32, "bench")
    controls.nets.append(cn)
    net.controls = controls
    side = SD15_UNET["sample_size"] * 8
    hint = torch.randint(0, 256, (4, side, side), dtype=torch.uint8)
    hint[3] = 255
    rows = controls.rows([PreparedUnit(0, 1.0, 0.0, 1.0, 0, hint)], 1, side, side, uncond=False)
    return cn, rows


@torch.inference_mode()
def count_controlnet() -> dict[str, float]:
    """GFLOPs of the SD1.5-shaped ControlNet's whole forward and of its part up to the first down
    layer (what a cached evaluation runs now), on the meta device."""
    net = build(SD15_UNET, "meta")
    cn, _ = controlled(net, "meta")
    kw = inputs(SD15_UNET, "meta")
    side = SD15_UNET["sample_size"] * 8
    hint = torch.rand(1, 3, side, side, device="meta")
    out = {}
    for name, call in (("cn_full", cn), ("cn_shallow", cn.start)):
        counter = FlopCounterMode(display=False)
        with counter:
            if name == "cn_full":
                call(kw["x"], kw["t"], kw["context"], hint)
            else:
                call(kw["x"], kw["t"], kw["context"], hint, min(LEVEL[0], len(cn.controlnet_down_blocks) - 1))
        out[f"{name}_gflop"] = counter.get_total_flops() / 1e9
    return out


@torch.inference_mode()
def measure_controlnet(repeats: int) -> dict[str, Any]:
    """CPU seconds of a cached evaluation with a ControlNet unit, before (the ControlNet in full) and
    now (up to its first down layer), interleaved; the outputs are checked equal."""
    from service.models.stepcache import sd_unet

    net = build(SD15_UNET, "cpu")
    _, rows = controlled(net, "cpu")
    kw = inputs(SD15_UNET, "cpu")
    x, t, ctx = kw["x"], kw["t"], kw["context"]
    new, old = (
        cache_rows(CacheSpec("deepcache", interval=1000, level=LEVEL[0]), 1),
        cache_rows(CacheSpec("deepcache", interval=1000, level=LEVEL[0]), 1),
    )

    def before() -> torch.Tensor:
        res = net.controls.staged(x, t, ctx, rows["control_hint"], rows["control_unit"], {}).full()
        split = min(LEVEL[0], sd_unet.skips(net.unet) - 1)
        return sd_unet.forward(net.unet, old, x, t, ctx, None, sd_unet.Full(res, split))

    def now() -> torch.Tensor:
        return net(x, t, ctx, **rows, cache=new)  # type: ignore[no-any-return]

    before(), now()  # the full evaluations the cached ones reuse
    times: dict[str, list[float]] = {"before": [], "now": []}
    outs = {}
    for _ in range(repeats):
        for name, call in (("before", before), ("now", now)):
            c = time.process_time()
            outs[name] = call()
            times[name].append(time.process_time() - c)
    assert torch.equal(outs["before"], outs["now"]), "a cached evaluation changed"
    return {
        **{f"{k}_median_s": statistics.median(v) for k, v in times.items()},
        **{f"{k}_best_s": min(v) for k, v in times.items()},
    }


def report_controlnet(threads: int, repeats: int) -> None:
    u, c = count(SD15_UNET), count_controlnet()
    before = u["cached_gflop"] + c["cn_full_gflop"]
    now = u["cached_gflop"] + c["cn_shallow_gflop"]
    m = measure_controlnet(repeats)
    cols = ["cached evaluation + 1 ControlNet (batch 1)", "GFLOP", "CPU s (median, best)"]
    print("| " + " | ".join(cols) + " |\n" + "|---" * len(cols) + "|")
    for name, gf in (("before", before), ("now", now)):
        print(
            f"| {name}: UNet cached {u['cached_gflop']:.0f} + ControlNet "
            f"{c['cn_full_gflop' if name == 'before' else 'cn_shallow_gflop']:.0f} | {gf:.0f} | "
            f"{m[f'{name}_median_s']:.2f} ({m[f'{name}_best_s']:.2f}) |"
        )
    ratio = m["before_median_s"] / m["now_median_s"]
    print(
        f"\nSD1.5-shaped, {SD15_UNET['sample_size']}x{SD15_UNET['sample_size']} latents, "
        f"CPU {threads} thread(s); full UNet {u['full_gflop']:.0f} GFLOP; "
        f"FLOP ratio now/before {now / before:.3f}, CPU time before/now {ratio:.2f}x (median)"
    )


def report_levels() -> None:
    """GFLOPs of a cached evaluation at every level (meta device), SD1.5- and SDXL-shaped."""
    from service.models.stepcache.sd_unet import skips

    print("| UNet | full GFLOP | cached GFLOP by level (0, 1, ...) |\n|---|---:|---|")
    for name, cfg in (
        ("SD1.5-shaped, 64x64 latents", SD15_UNET),
        ("SDXL-shaped, 128x128 latents", SDXL_UNET),
    ):
        cached = []
        for level in range(skips(build(cfg, "meta").unet)):
            LEVEL[0] = level
            r = count(cfg)
            cached.append(f"{r['cached_gflop']:.0f}")
        print(f"| {name} | {r['full_gflop']:.0f} | {', '.join(cached)} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sdxl", action="store_true", help="also count the SDXL-shaped UNet's FLOPs (meta)")
    p.add_argument("--controlnet", action="store_true", help="a cached evaluation with a ControlNet unit")
    p.add_argument("--level", type=int, default=1, help="the split level (the extension's resnet level)")
    p.add_argument("--levels", action="store_true", help="count a cached evaluation's FLOPs at every level")
    a = p.parse_args()
    LEVEL[0] = a.level
    if a.levels:
        report_levels()
        return 0
    torch.set_num_threads(a.threads)
    if a.controlnet:
        report_controlnet(a.threads, a.repeats)
        return 0
    cols = ["UNet (batch 1)", "full GFLOP", "cached GFLOP", "FLOP ratio", "full s", "cached s", "speed-up"]
    print("| " + " | ".join(cols) + " |\n" + "|---" * len(cols) + "|")
    r = count(SD15_UNET) | measure(SD15_UNET, a.repeats)
    best = r["full_best_s"] / r["cached_best_s"]
    speed = f"{r['full_median_s'] / r['cached_median_s']:.2f}x (best {best:.2f}x)"
    print(
        f"| SD1.5-shaped, 64x64 latents, CPU {a.threads} threads | {r['full_gflop']:.0f} | "
        f"{r['cached_gflop']:.0f} | {r['cached_gflop'] / r['full_gflop']:.3f} | "
        f"{r['full_median_s']:.2f} (best {r['full_best_s']:.2f}) | "
        f"{r['cached_median_s']:.2f} (best {r['cached_best_s']:.2f}) | {speed} |"
    )
    if a.sdxl:
        x = count(SDXL_UNET)
        print(
            f"| SDXL-shaped, 128x128 latents (FLOPs only) | {x['full_gflop']:.0f} | "
            f"{x['cached_gflop']:.0f} | "
            f"{x['cached_gflop'] / x['full_gflop']:.3f} | - | - | - |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

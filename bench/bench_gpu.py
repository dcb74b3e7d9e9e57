"""GPU suite (issue 28 §4): real-shaped models with random weights, eager vs compiled vs diffusers.

Cases (``--smoke`` shrinks every network so the whole script runs on a CPU in seconds; the figures
of a smoke run mean nothing, it only proves the script works):

- ``sd15``: an SD 1.5-shaped UNet (860M parameters) at 512x512 (64x64 latents, CLIP-L context),
  one model call for 1 image (2 rows with CFG) and for 16 images (32 rows), eager and compiled;
  then a 20-step generation of one image through our loading code and sampler loop vs diffusers'
  StableDiffusionPipeline on the same weights, and the service (``kdiff serve``) at concurrency 32
  with mixed samplers (images/s, rows per model call from /metrics).
- ``sdxl``: an SDXL-shaped UNet (2.6B) at 1024x1024, 1 image with CFG, eager and compiled.
- ``flux``: a Flux-shaped transformer (12B, 19 double + 38 single blocks) at 1024x1024 (4096 image
  tokens, 512 text tokens), one call for 1 image, eager and compiled.

Every model call is timed after warm-up with the device synchronised; FLOPs per call come from
torch's FlopCounterMode, shown as achieved TFLOP/s and as a share of the peak a large bf16/fp16
matmul reaches on the same device (measured here, not a datasheet figure). Memory: the device's
peak allocation per case. Writes a JSON and a markdown table.

    python bench/bench_gpu.py --device cuda --out docs/bench_gpu.json --md docs/bench_gpu.md
    python bench/bench_gpu.py --smoke --device cpu --out /tmp/gpu.json --md /tmp/gpu.md

``bench/gpu_suite.sh`` runs the first line with a time limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SAMPLERS = ["euler", "dpmpp_2m", "euler_ancestral", "dpmpp_2m_sde", "heun", "uni_pc"]


# --- model shapes (diffusers configs of the published models; --smoke: tiny ones) ---


# the smoke run's UNets: two levels of 16 and 32 channels
TINY_UNET = {"sample_size": 8, "block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8}


def sd15_unet_config(smoke: bool) -> dict[str, Any]:
    if smoke:
        down, up = ("CrossAttnDownBlock2D", "DownBlock2D"), ("UpBlock2D", "CrossAttnUpBlock2D")
        tiny = {"cross_attention_dim": 32, "attention_head_dim": 4}
        return {**TINY_UNET, **tiny, "down_block_types": down, "up_block_types": up}
    return {
        "sample_size": 64,
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    }


def sdxl_unet_config(smoke: bool) -> dict[str, Any]:
    """SDXL's UNet: text_time added conditioning (pooled text + 6 size ids, 256 wide each)."""
    pooled, ids = (32, 8) if smoke else (1280, 256)
    added = {
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": ids,
        "projection_class_embeddings_input_dim": pooled + 6 * ids,
        "use_linear_projection": True,
    }
    if smoke:
        down, up = ("DownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D")
        tiny = {"cross_attention_dim": 48, "attention_head_dim": 4, "transformer_layers_per_block": (1, 2)}
        return {**TINY_UNET, **tiny, "down_block_types": down, "up_block_types": up, **added}
    return {
        "sample_size": 128,
        "block_out_channels": (320, 640, 1280),
        "layers_per_block": 2,
        "cross_attention_dim": 2048,
        "attention_head_dim": (5, 10, 20),
        "transformer_layers_per_block": (1, 2, 10),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        **added,
    }


def flux_config(smoke: bool) -> dict[str, Any]:
    """Flux.1's transformer (19 double-stream + 38 single-stream blocks, 3072 wide, guidance input)."""
    if smoke:
        from tests.support.flow_tiny import tiny_flux_config

        return tiny_flux_config(guidance=True)
    return {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": True,
        "axes_dims_rope": (16, 56, 56),
    }


@contextlib.contextmanager
def building(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Parameters created directly on the device in the target dtype (a 12B model built in float32 on
    the host first would need 48 GB and minutes)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(old)


# --- timing ---


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per call, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak(device: torch.device, dtype: torch.dtype, smoke: bool) -> float:
    """FLOP/s of a large square matmul in ``dtype``: the reference the model calls are compared to."""
    n = 256 if smoke else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    s = timed(lambda: a @ b, device, 2, 3 if smoke else 20)
    return 2 * n**3 / s


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        cuda = self.device.type == "cuda"
        bf16 = cuda and torch.cuda.is_bf16_supported()
        self.dtype = torch.bfloat16 if bf16 else (torch.float16 if cuda else torch.float32)
        self.rows: list[dict[str, Any]] = []
        self.peak = matmul_peak(self.device, self.dtype, args.smoke)
        self.deadline = time.monotonic() + args.budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def record(self, **row: Any) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)

    def calls(
        self, case: str, model: Any, make_inputs: Callable[[int], dict[str, Any]], batches: list[int]
    ) -> None:
        """Eager then compiled model calls at each batch (rows), with FLOPs and memory."""
        a = self.args
        iters, warm = (2, 1) if a.smoke else (a.iters, 3)
        runs: list[tuple[str, Any]] = [("eager", model)]
        if not a.no_compile:
            runs.append(("compiled", torch.compile(model, dynamic=False)))
        for mode, fn in runs:
            for rows in batches:
                if self.left() < 30 and not a.smoke:
                    self.record(case=case, mode=mode, rows=rows, skipped="time budget spent")
                    continue
                kw = make_inputs(rows)
                reset_peak(self.device)
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    try:
                        fn(**kw)  # the first call (compiles, for the compiled model)
                    except Exception as exc:  # a compile failure is a result, not the end of the suite
                        self.record(
                            case=case, mode=mode, rows=rows, error=f"{type(exc).__name__}: {exc}"[:300]
                        )
                        continue
                    sync(self.device)
                    first = time.perf_counter() - t0
                    s = timed(lambda fn=fn, kw=kw: fn(**kw), self.device, warm, iters)
                    flops = count_flops(lambda kw=kw: model(**kw)) if mode == "eager" else None
                self.record(
                    case=case,
                    mode=mode,
                    rows=rows,
                    ms_per_call=1000 * s,
                    calls_per_s=1 / s,
                    first_call_s=first,
                    tflops=None if flops is None else flops / s / 1e12,
                    share_of_matmul_peak=None if flops is None else flops / s / self.peak,
                    peak_gib=peak_gib(self.device),
                )


def sd_inputs(
    cfg: dict[str, Any], device: torch.device, dtype: torch.dtype, sdxl: bool
) -> Callable[[int], dict[str, Any]]:
    lat = int(cfg["sample_size"])

    def make(rows: int) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "sample": torch.randn(rows, 4, lat, lat, device=device, dtype=dtype),
            "timestep": torch.full((rows,), 500.0, device=device),
            "encoder_hidden_states": torch.randn(
                rows, 77, int(cfg["cross_attention_dim"]), device=device, dtype=dtype
            ),
            "return_dict": False,
        }
        if sdxl:
            pooled = int(cfg["projection_class_embeddings_input_dim"]) - 6 * int(
                cfg["addition_time_embed_dim"]
            )
            kw["added_cond_kwargs"] = {
                "text_embeds": torch.randn(rows, pooled, device=device, dtype=dtype),
                "time_ids": torch.tensor(
                    [[lat * 8, lat * 8, 0, 0, lat * 8, lat * 8]] * rows, device=device, dtype=dtype
                ),
            }
        return kw

    return make


def flux_inputs(
    cfg: dict[str, Any], device: torch.device, dtype: torch.dtype, smoke: bool
) -> Callable[[int], dict[str, Any]]:
    tokens, text = (16, 8) if smoke else (4096, 512)
    side = int(tokens**0.5)

    def make(rows: int) -> dict[str, Any]:
        ids = torch.zeros(side, side, 3, device=device)
        ids[..., 1] = torch.arange(side, device=device)[:, None]
        ids[..., 2] = torch.arange(side, device=device)[None, :]
        return {
            "hidden_states": torch.randn(rows, tokens, int(cfg["in_channels"]), device=device, dtype=dtype),
            "encoder_hidden_states": torch.randn(
                rows, text, int(cfg["joint_attention_dim"]), device=device, dtype=dtype
            ),
            "pooled_projections": torch.randn(
                rows, int(cfg["pooled_projection_dim"]), device=device, dtype=dtype
            ),
            "timestep": torch.full((rows,), 0.5, device=device, dtype=dtype),
            "img_ids": ids.reshape(-1, 3),
            "txt_ids": torch.zeros(text, 3, device=device),
            "guidance": torch.full((rows,), 3.5, device=device, dtype=dtype),
            "return_dict": False,
        }

    return make


# --- cases ---


def case_unets(suite: Suite) -> None:
    from diffusers import UNet2DConditionModel

    a, dev, dt = suite.args, suite.device, suite.dtype
    for case, cfg, sdxl, batches in (
        ("sd15 unet 512", sd15_unet_config(a.smoke), False, [2, 32]),
        ("sdxl unet 1024", sdxl_unet_config(a.smoke), True, [2]),
    ):
        if case.split()[0] not in a.cases:
            continue
        with building(dev, dt):
            unet = UNet2DConditionModel(**cfg).eval()
        if dev.type == "cuda":
            unet = unet.to(memory_format=torch.channels_last)
        suite.calls(case, unet, sd_inputs(cfg, dev, dt, sdxl), batches)
        del unet
        reset_peak(dev)


def case_flux(suite: Suite) -> None:
    from diffusers import FluxTransformer2DModel

    a, dev, dt = suite.args, suite.device, suite.dtype
    cfg = flux_config(a.smoke)
    with building(dev, dt):
        model = FluxTransformer2DModel(**cfg).eval()
    suite.calls("flux transformer 1024", model, flux_inputs(cfg, dev, dt, a.smoke), [1])
    del model
    reset_peak(dev)


def write_sd15_store(root: Path, smoke: bool, dtype: torch.dtype) -> Path:
    """An SD 1.5-shaped model in the diffusers layout with a manifest, as users' stores hold them."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.support.sd_tiny import write_tokenizer

    folder = root / "sd15"
    vocab = write_tokenizer(folder / "tokenizer")
    torch.manual_seed(0)
    hidden, layers = (32, 2) if smoke else (768, 12)
    enc = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4 if smoke else 12,
            max_position_embeddings=77,
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
            hidden_act="quick_gelu",
        )
    )
    ucfg = sd15_unet_config(smoke)
    ucfg["cross_attention_dim"] = hidden
    unet = UNet2DConditionModel(**ucfg)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 16, 16) if smoke else (128, 256, 512, 512),
        layers_per_block=1 if smoke else 2,
        norm_num_groups=8 if smoke else 32,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        scaling_factor=0.18215,
    )
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.1)  # predictions of order 1, as a trained model's
    save = dtype if dtype != torch.float32 else None
    for name, part in (("text_encoder", enc), ("unet", unet), ("vae", vae)):
        (part.to(save) if save else part).save_pretrained(str(folder / name))
    sched = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    sched.save_pretrained(str(folder / "scheduler"))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    size = 64 if smoke else 512
    manifest = {
        "name": "sd15",
        "kind": "stable_diffusion",
        "description": "random-weight SD 1.5-shaped model (GPU suite)",
        "defaults": {
            "sampler": "euler",
            "schedule": "karras",
            "steps": 20,
            "cfg_scale": 7.0,
            "width": size,
            "height": size,
        },
        "max_size": size,
    }
    if save:
        manifest["dtype"] = {torch.float16: "float16", torch.bfloat16: "bfloat16"}[save]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return root


def case_sd15_generation(suite: Suite, store: Path) -> None:
    """20 steps of one image: our loading code + sampler loop vs diffusers' pipeline, same weights."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from service.models.store import ModelStore
    from service.models.text_generate import generate

    a, dev = suite.args, suite.device
    steps, size = (3, 64) if a.smoke else (20, 512)
    loaded: Any = ModelStore(store).load("sd15", dev, suite.dtype)
    m = loaded.text_model
    ours = timed(
        lambda: generate(
            m, "a red cat", seeds=[1], sampler="euler", schedule="karras", steps=steps, cfg_scale=7.0
        ),
        dev,
        1,
        1 if a.smoke else 3,
    )
    reset_peak(dev)
    c = m.components
    pipe = StableDiffusionPipeline(
        vae=c.vae,
        text_encoder=c.text_encoders[0],
        tokenizer=c.tokenizers[0],
        unet=c.unet,
        scheduler=EulerDiscreteScheduler.from_config(c.scheduler_config, use_karras_sigmas=True),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    theirs = timed(
        lambda: pipe("a red cat", num_inference_steps=steps, guidance_scale=7.0, height=size, width=size),
        dev,
        1,
        1 if a.smoke else 3,
    )
    for who, s in (("ours (kdiff generate)", ours), ("diffusers StableDiffusionPipeline", theirs)):
        suite.record(
            case=f"sd15 {size}px {steps} steps, 1 image",
            mode=who,
            rows=2,
            ms_per_call=None,
            s_per_image=s,
            it_per_s=steps / s,
            peak_gib=peak_gib(dev),
        )


def case_sd15_service(suite: Suite, store: Path) -> None:
    """`kdiff serve` at concurrency 32, mixed samplers: images/s and rows per model call."""
    import httpx

    from tests.support.server import running

    a = suite.args
    steps, size = (3, 64) if a.smoke else (20, 512)
    seconds = 3.0 if a.smoke else min(a.service_s, max(10.0, suite.left() - 60))
    env = {"KDIFF_DEVICE": a.device, "KDIFF_TORCH_THREADS": "4", "KDIFF_MAX_BATCH_ROWS": "64"}
    with (
        tempfile.TemporaryDirectory() as log_dir,
        running(store, Path(log_dir) / "serve.log", **env) as server,
    ):

        async def client(i: int, stop: float, http: httpx.AsyncClient, done: list[float]) -> None:
            k = i
            while time.monotonic() < stop:
                body = {
                    "model": "sd15",
                    "prompt": f"a red cat {k}",
                    "sampler": SAMPLERS[k % len(SAMPLERS)],
                    "steps": steps,
                    "seed": k,
                    "width": size,
                    "height": size,
                }
                t0 = time.monotonic()
                r = await http.post(f"{server.url}/sample", json=body, timeout=600)
                r.raise_for_status()
                done.append(time.monotonic() - t0)
                k += 32

        async def load() -> tuple[list[float], float]:
            done: list[float] = []
            async with httpx.AsyncClient() as http:
                await client(0, time.monotonic() + 0.1, http, [])  # warm-up: one request
                t0 = time.monotonic()
                stop = t0 + seconds
                await asyncio.gather(*(client(i, stop, http, done) for i in range(32)))
                return done, time.monotonic() - t0

        done, wall = asyncio.run(load())
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    rows, calls = _metric_sum(metrics, "rows"), _metric_sum(metrics, "calls")
    suite.record(
        case=f"sd15 {size}px {steps} steps, service",
        mode="kdiff serve, concurrency 32, mixed samplers",
        rows=rows / calls if calls else None,
        images=len(done),
        images_per_s=len(done) / wall,
        p50_s=sorted(done)[len(done) // 2] if done else None,
    )


def _metric_sum(text: str, what: str) -> float:
    """Rows evaluated or model calls, summed over models, from the rows-per-call histogram in /metrics."""
    names = {"rows": ("kdiff_batch_rows_sum",), "calls": ("kdiff_batch_rows_count",)}
    total = 0.0
    for line in text.splitlines():
        if line.startswith(names[what]) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


COLUMNS = (  # (header, row key, format)
    ("rows", "rows", ".1f"),
    ("ms/call", "ms_per_call", ".2f"),
    ("calls/s", "calls_per_s", ".1f"),
    ("first call s", "first_call_s", ".1f"),
    ("TFLOP/s", "tflops", ".1f"),
    ("share of matmul peak", "share_of_matmul_peak", ".0%"),
    ("s/image", "s_per_image", ".3f"),
    ("it/s", "it_per_s", ".1f"),
    ("images/s", "images_per_s", ".2f"),
    ("p50 s", "p50_s", ".2f"),
    ("peak GiB", "peak_gib", ".1f"),
)


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    head = (
        f"GPU suite on {meta['device_name']} ({meta['dtype']}; a large matmul reaches "
        f"{meta['matmul_tflops']:.0f} TFLOP/s here), torch {meta['torch']}, {meta['when']}"
    )
    if meta["smoke"]:
        head += " -- SMOKE RUN (tiny models; the figures mean nothing)"
    out = [head, "", "| case | mode | " + " | ".join(c[0] for c in COLUMNS) + " |"]
    out.append("|" + " --- |" * (len(COLUMNS) + 2))
    for r in rows:
        if "error" in r or "skipped" in r:
            cells = [str(r.get("error") or r.get("skipped"))] + [""] * (len(COLUMNS) - 1)
        else:
            cells = ["" if r.get(k) is None else format(r[k], spec) for _, k, spec in COLUMNS]
        out.append(f"| {r['case']} | {r['mode']} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny models (a CPU check of the script itself)")
    ap.add_argument("--cases", nargs="+", default=["sd15", "sdxl", "flux", "generate", "service"])
    ap.add_argument("--iters", type=int, default=10, help="timed calls per point")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--budget-s", type=float, default=420.0, help="later points are skipped past this")
    ap.add_argument("--service-s", type=float, default=60.0, help="seconds of load on the service")
    ap.add_argument("--out", type=Path, default=Path("docs/bench_gpu.json"))
    ap.add_argument("--md", type=Path, default=Path("docs/bench_gpu.md"))
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run with --smoke --device cpu to check the script")
    suite = Suite(args)
    dev = suite.device
    meta = {
        "device_name": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else platform.processor() or "cpu",
        "dtype": str(suite.dtype).removeprefix("torch."),
        "matmul_tflops": suite.peak / 1e12,
        "torch": torch.__version__,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "smoke": args.smoke,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    print(json.dumps(meta), flush=True)
    case_unets(suite)
    if "flux" in args.cases:
        case_flux(suite)
    if {"generate", "service"} & set(args.cases):
        with tempfile.TemporaryDirectory() as tmp:
            store = write_sd15_store(Path(tmp), args.smoke, suite.dtype)
            if "generate" in args.cases:
                case_sd15_generation(suite, store)
            if "service" in args.cases:
                case_sd15_service(suite, store)
    args.out.write_text(json.dumps({"meta": meta, "rows": suite.rows}, indent=1))
    args.md.write_text(markdown(meta, suite.rows))
    print(markdown(meta, suite.rows))


if __name__ == "__main__":
    main()

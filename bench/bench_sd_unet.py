"""Stable Diffusion UNet throughput: our engine versus diffusers' pipeline, same model, same machine.

An SD1.5-shaped UNet with random weights (diffusers' UNet2DConditionModel with SD1.5's config,
built locally: nothing is downloaded) in a diffusers-layout folder with a small random CLIP text
encoder (768 wide, as SD1.5's cross-attention expects) and a tiny VAE. Both sides run euler, CFG
(two UNet rows per image), ``--steps`` steps at 512x512 (64x64 latents), batch 1 and 16:

- diffusers: ``StableDiffusionPipeline(..., output_type="latent")``, the UNet loop only;
- ours: the model store's loader and the iteration-level engine (one job of ``batch`` images).

UNet it/s = sampler steps per second; achieved FLOP/s = it/s x rows per call x 0.68 TFLOP (one SD1.5
UNet row at 64x64 latents), reported as a share of ``--peak-tflops`` (H100 SXM dense fp16: 989).

    python bench/bench_sd_unet.py --device cuda --dtype float16 --batches 1 16 --steps 20
    python bench/bench_sd_unet.py --tiny --device cpu --dtype float32 --threads 1 --steps 5   # CPU smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.sd_tiny import save_diffusers, text_encoder, write_manifest  # noqa: E402

SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
TFLOP_PER_ROW = 0.68  # one SD1.5 UNet call at 64x64 latents, per row


def build(folder: Path, tiny: bool) -> tuple[str, int]:
    """A diffusers-layout model folder in a store; returns (model name, image size)."""
    model = folder / "sd15bench"
    save_diffusers(model)
    size = 64
    if not tiny:
        from diffusers import UNet2DConditionModel

        vocab = json.loads((model / "tokenizer" / "vocab.json").read_text())
        text_encoder(len(vocab), 768, False, seed=10).save_pretrained(str(model / "text_encoder"))
        torch.manual_seed(0)
        UNet2DConditionModel(**SD15_UNET).half().save_pretrained(str(model / "unet"))  # 1.7 GB, not 3.4
        size = 512
    defaults = {"sampler": "euler", "schedule": "normal", "width": size, "height": size}
    write_manifest(model, defaults=defaults, max_size=1024)
    return model.name, size


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_diffusers(folder: Path, device: str, dtype: torch.dtype, batch: int, steps: int, size: int) -> float:
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=dtype, safety_checker=None)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    # prompts encoded once outside the timing, as ours are (its prompt cache): the UNet loop is timed
    embeds, negative = pipe.encode_prompt("a lighthouse at dusk", device, batch, True)

    def run() -> None:
        pipe(
            prompt_embeds=embeds,
            negative_prompt_embeds=negative,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=7.5,
            output_type="latent",
        )

    run()  # warm-up
    sync(device)
    t = time.perf_counter()
    run()
    sync(device)
    return steps / (time.perf_counter() - t)


def time_ours(store: Path, name: str, device: str, dtype: torch.dtype, batch: int, steps: int) -> float:
    from service.engine import Engine, EngineConfig, JobRequest, ModelHandle
    from service.models.store import ModelStore
    from service.sampling.ksampler import SamplingSpec

    model = ModelStore(store).load(name, device, dtype)
    sd = model.text_model  # type: ignore[attr-defined]
    # decode=None: the job returns latents, as diffusers' output_type="latent" does (no VAE on either side)
    handle = ModelHandle(name, model.denoiser, model.latent_shape, model.device, model.dtype, None)
    inp = sd.job_inputs("a lighthouse at dusk", None, n=batch, cfg_scale=7.5)

    async def run() -> float:
        engine = Engine(handle, EngineConfig(max_batch_rows=2 * batch, batch_wait_ms=0))
        engine.start()
        spec = SamplingSpec("euler", "normal", steps, list(range(batch)))
        t = time.perf_counter()
        job = engine.submit(JobRequest(spec, batch, inp.cond, inp.uncond, 7.5))
        await job.wait_done()
        sync(device)
        elapsed = time.perf_counter() - t
        await engine.stop()
        if job.error is not None:
            raise RuntimeError(job.error.message)
        return steps / elapsed

    asyncio.run(run())  # warm-up
    return asyncio.run(run())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense fp16 peak")
    p.add_argument("--tiny", action="store_true", help="tiny UNet at 64x64 (a smoke run, not a benchmark)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)
        name, size = build(store, a.tiny)
        results: dict[str, Any] = {
            "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else a.device,
            "dtype": a.dtype,
            "unet": "tiny" if a.tiny else "SD1.5-shaped, random weights",
            "size": size,
            "steps": a.steps,
            "rows": {},
        }
        cols = ["batch", "rows/call", "diffusers it/s", "ours it/s", "ours / diffusers", "TFLOP/s", "of peak"]
        print("| " + " | ".join(cols) + " |\n" + "|---" * len(cols) + "|")
        for b in a.batches:
            theirs = time_diffusers(store / name, a.device, dtype, b, a.steps, size)
            ours = time_ours(store, name, a.device, dtype, b, a.steps)
            tflops = ours * 2 * b * TFLOP_PER_ROW
            results["rows"][b] = {"diffusers_it_s": theirs, "ours_it_s": ours, "ours_tflops": tflops}
            share = "n/a (tiny)" if a.tiny else f"{tflops / a.peak_tflops:.1%}"
            cells = [b, 2 * b, f"{theirs:.2f}", f"{ours:.2f}", f"{ours / theirs:.2f}", f"{tflops:.1f}", share]
            print("| " + " | ".join(map(str, cells)) + " |")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

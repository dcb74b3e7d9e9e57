"""Hires fix, inpainting from an upload, previews, and 16 concurrent prompts sharing model calls."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from service.comfy import Comfy
from service.comfy.testing import MemoryContext
from service.image_gate import GatedImage
from service.serving.request import GenerationRequest

from .conftest import pixels, run
from .workflows import fresh, open_webui


def only_image(ctx: MemoryContext, outputs: dict[str, Any], node: str = "9") -> np.ndarray:
    (image,) = outputs[node]["images"]
    return pixels(ctx.files[(image["type"], image["subfolder"], image["filename"])])


def test_hires_fix_chain_on_tiny_sd(store: Path) -> None:
    """KSampler -> LatentUpscaleBy 2 -> KSampler(denoise 0.5) -> VAEDecode: the second pass is /sample's
    img2img of the first pass's image, resized, at twice the size."""

    async def scenario(comfy: Comfy) -> None:
        wf = open_webui("sd1", "a red cat", 32, 32, 1, 3, 4)
        wf["10"] = {
            "class_type": "LatentUpscaleBy",
            "inputs": {"samples": ["3", 0], "upscale_method": "bilinear", "scale_by": 2.0},
        }
        second = {
            "seed": 4,
            "steps": 4,
            "cfg": 8,
            "sampler_name": "euler",
            "scheduler": "karras",
            "denoise": 0.5,
        }
        links = {"model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["10", 0]}
        wf["11"] = {"class_type": "KSampler", "inputs": second | links}
        wf["8"]["inputs"]["samples"] = ["11", 0]
        wf["12"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}}
        wf["13"] = {"class_type": "PreviewImage", "inputs": {"images": ["12", 0]}}
        ctx = MemoryContext()
        r = await comfy.run(wf, "hr", ctx)
        assert r.status_str == "success", r.error
        final, first = only_image(ctx, r.outputs), only_image(ctx, r.outputs, "13")
        assert first.shape == (32, 32, 3) and final.shape == (64, 64, 3)
        import torch

        from service.comfy.nodes_image import resize
        from service.comfy.runtime import image_to_pil

        up = resize(torch.from_numpy(first.copy()).float().div(255)[None], 64, 64, "bilinear", "disabled")
        init = GatedImage(image_to_pil(up[0]), "init_image")
        fields = {
            "prompt": "a red cat",
            "cfg_scale": 8.0,
            "sampler": "euler",
            "schedule": "karras",
            "steps": 4,
        }
        job = await comfy.service.generate(
            GenerationRequest(
                model="sd1", seed=[4], width=64, height=64, init_image=init, denoise=0.5, **fields
            )
        )
        await job.wait_done()
        assert np.array_equal(final, pixels(job.result.pngs[0]))

    run(store, scenario)


def _rgba_upload() -> bytes:
    img = Image.new("RGBA", (16, 16), (200, 200, 200, 255))
    for x in range(4, 12):
        for y in range(4, 12):
            img.putpixel((x, y), (0, 0, 0, 0))  # transparent: ComfyUI's LoadImage mask is 1 there
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_inpainting_from_an_upload_on_digits(store: Path) -> None:
    """LoadImage (its alpha as the mask) -> VAEEncode + SetLatentNoiseMask -> KSampler: /sample's
    img2img with that init image and mask."""

    async def scenario(comfy: Comfy) -> None:
        ctx = MemoryContext()
        ctx.files[("input", "", "card.png")] = _rgba_upload()
        wf = open_webui("digits", "a 2", 16, 16, 1, 5, 8)
        wf["3"]["inputs"]["denoise"] = 0.9
        wf["10"] = {"class_type": "LoadImage", "inputs": {"image": "card.png"}}
        wf["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
        wf["12"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["11", 0], "mask": ["10", 1]}}
        wf["3"]["inputs"]["latent_image"] = ["12", 0]
        assert comfy.validate(wf, ctx).ok
        assert (
            comfy.validate(wf).node_errors["10"]["errors"][0]["details"]
            == "image - Invalid image file: card.png"
        )
        r = await comfy.run(wf, "inp", ctx)
        assert r.status_str == "success", r.error
        got = only_image(ctx, r.outputs)
        rgba = Image.open(io.BytesIO(_rgba_upload()))
        mask = Image.eval(rgba.getchannel("A"), lambda a: 255 - a)
        fields = {
            "class_label": 2,
            "cfg_scale": 8.0,
            "sampler": "euler",
            "schedule": "exponential",
            "steps": 5,
        }
        images = {
            "init_image": GatedImage(rgba.convert("RGB"), "init_image"),
            "mask": GatedImage(mask, "mask"),
        }
        req = GenerationRequest(model="digits", seed=[8], denoise=0.9, **fields, **images)
        job = await comfy.service.generate(req)
        await job.wait_done()
        assert np.array_equal(got, pixels(job.result.pngs[0]))
        assert (got[0, 0] == 200).all()  # kept where the mask is 0

    run(store, scenario)


def test_previews_are_png_frames(store: Path) -> None:
    async def scenario(comfy: Comfy) -> None:
        ctx = MemoryContext(previews=True)
        wf = open_webui("digits", "5", 16, 16, 1, 30, 3)
        r = await comfy.run(wf, "pv", ctx)
        assert r.status_str == "success"
        frames = [d for k, d in ctx.events if k == "b_preview"]
        assert frames and all(isinstance(f, bytes) and f.startswith(b"\x89PNG") for f in frames)

    run(store, scenario)


def test_sixteen_concurrent_prompts_share_model_calls(store: Path) -> None:
    """16 prompts at once: their samplers' rows go through shared model calls (rows per call from
    the service's metrics), and each image is the one its prompt makes alone."""

    async def scenario(comfy: Comfy) -> tuple[float, float]:
        metrics = comfy.service.metrics.registry
        wfs = [open_webui("digits", str(i % 10), 16, 16, 1, 8, 100 + i) for i in range(16)]
        ctxs = [MemoryContext(owner=f"k{i}") for i in range(16)]
        results = await asyncio.gather(
            *(comfy.run(fresh(w), f"c{i}", c) for i, (w, c) in enumerate(zip(wfs, ctxs, strict=True)))
        )
        assert all(r.status_str == "success" for r in results)
        rows = metrics.get_sample_value("kdiff_batch_rows_sum", {"model": "digits"})
        calls = metrics.get_sample_value("kdiff_batch_rows_count", {"model": "digits"})
        alone = await comfy.run(fresh(wfs[5]), "solo", solo := MemoryContext(owner="solo"))
        assert np.array_equal(only_image(ctxs[5], results[5].outputs), only_image(solo, alone.outputs))
        return rows, calls

    rows, calls = run(store, scenario)
    # 16 prompts x 8 steps x 2 rows (cfg 8) = 256 rows; one prompt at a time would take 128 calls
    assert rows == 256 and calls < 64, (rows, calls)
    print(f"16 concurrent prompts: {rows:.0f} rows in {calls:.0f} model calls ({rows / calls:.1f} per call)")

"""Inpainting from an upload, previews, and 16 concurrent prompts sharing model calls (the hires-fix
chain: test_latents.py)."""

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

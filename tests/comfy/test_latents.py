"""LATENT hand-over on ComfyUI's rules: the base + refiner split (two KSamplerAdvanced halves with
leftover noise) is one KSampler run; ComfyUI's hires-fix example chain (KSampler -> LatentUpscale ->
KSampler denoise 0.5) is A1111's latent hires fix on /sample's path; start_at_step on VAEEncode's
pixels is img2img on the tail of the same schedule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from service.comfy import Comfy
from service.comfy.testing import MemoryContext
from service.image_gate import GatedImage
from service.serving.hires import HiresFix
from service.serving.request import GenerationRequest

from .conftest import pixels, run
from .workflows import open_webui

LINKS = {"model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0]}
TINY = {"prompt": "a red cat", "cfg_scale": 8.0, "sampler": "euler", "schedule": "karras"}


def advanced(latent: list[Any], **inputs: Any) -> dict[str, Any]:
    """KSamplerAdvanced as ComfyUI's SDXL base + refiner example wires it (values ours, tiny)."""
    base = {"add_noise": "enable", "noise_seed": 5, "steps": 6, "cfg": 8, "sampler_name": "euler"}
    base |= {"scheduler": "karras", "start_at_step": 0, "end_at_step": 10000}
    base |= {"return_with_leftover_noise": "disable", "latent_image": latent}
    return {"class_type": "KSamplerAdvanced", "inputs": base | LINKS | inputs}


async def image_of(comfy: Comfy, wf: dict[str, Any], node: str = "9") -> np.ndarray:
    return (await images_of(comfy, wf))[node]


async def images_of(comfy: Comfy, wf: dict[str, Any]) -> dict[str, np.ndarray]:
    """Each image output node's (one) image."""
    ctx = MemoryContext()
    r = await comfy.run(wf, f"p{id(wf)}", ctx)
    assert r.status_str == "success", r.error
    out = {}
    for node, outputs in r.outputs.items():
        (image,) = outputs["images"]
        out[node] = pixels(ctx.files[(image["type"], image["subfolder"], image["filename"])])
    return out


async def service_image(comfy: Comfy, request: GenerationRequest) -> np.ndarray:
    job = await comfy.service.generate(request)
    await job.wait_done()
    return pixels(job.result.pngs[0])


def split(end: int, second_noise: str = "disable") -> dict[str, Any]:
    """Open WebUI's workflow with its KSampler replaced by two KSamplerAdvanced halves."""
    wf = open_webui("sd1", "a red cat", 32, 32, 1, 6, 5)
    del wf["3"]
    wf["20"] = advanced(["5", 0], end_at_step=end, return_with_leftover_noise="enable")
    wf["21"] = advanced(["20", 0], add_noise=second_noise, noise_seed=99, start_at_step=end)
    wf["8"]["inputs"]["samples"] = ["21", 0]
    return wf


def test_two_advanced_halves_with_leftover_noise_are_one_ksampler_run(store: Path, tmp_path: Path) -> None:
    """euler is deterministic: steps 0-3 with leftover noise, then 3-6 from those latents without
    new noise, is exactly the 6-step run of the same seed (pixel-equal). With a state dir, as the
    journal records every request (latents included)."""

    async def scenario(comfy: Comfy) -> None:
        one = open_webui("sd1", "a red cat", 32, 32, 1, 6, 5)
        one["3"]["inputs"].update(sampler_name="euler", scheduler="karras")
        whole = await image_of(comfy, one)
        assert np.array_equal(await image_of(comfy, split(3)), whole)
        assert np.array_equal(await image_of(comfy, split(1)), whole)
        want = await service_image(
            comfy, GenerationRequest(model="sd1", seed=5, steps=6, width=32, height=32, **TINY)
        )
        assert np.array_equal(whole, want)
        # the hand-over is what makes it equal: new noise on the leftover latents is another image
        assert not np.array_equal(await image_of(comfy, split(3, "enable")), whole)

    run(store, scenario, state_dir=str(tmp_path / "state"))


def test_comfyui_hires_example_chain_is_the_latent_hires_fix(store: Path) -> None:
    """ComfyUI's 2-pass example (KSampler -> LatentUpscale nearest-exact, 1.5x -> KSampler denoise
    0.5) is /sample with A1111's hires fix 'Latent (nearest-exact)' to that size: the first pass's
    latents interpolated, the same seed's noise, the tail of an int(steps / denoise) schedule."""

    async def scenario(comfy: Comfy) -> None:
        wf = open_webui("sd1", "a red cat", 32, 32, 1, 3, 4)
        wf["3"]["inputs"].update(sampler_name="euler", scheduler="karras")
        up = {"samples": ["3", 0], "upscale_method": "nearest-exact", "width": 48, "height": 48}
        wf["10"] = {"class_type": "LatentUpscale", "inputs": up | {"crop": "disabled"}}
        second = {"seed": 4, "steps": 4, "cfg": 8, "sampler_name": "euler", "scheduler": "karras"}
        wf["11"] = {
            "class_type": "KSampler",
            "inputs": second | LINKS | {"denoise": 0.5, "latent_image": ["10", 0]},
        }
        wf["8"]["inputs"]["samples"] = ["11", 0]
        wf["12"] = {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["4", 2]}}
        wf["13"] = {"class_type": "PreviewImage", "inputs": {"images": ["12", 0]}}
        images = await images_of(comfy, wf)
        got = images["9"]
        assert got.shape == (48, 48, 3)
        hires = HiresFix(resize_x=48, resize_y=48, upscaler="Latent (nearest-exact)", steps=4, denoise=0.5)
        request = GenerationRequest(model="sd1", seed=4, steps=3, width=32, height=32, hires=hires, **TINY)
        assert np.array_equal(got, await service_image(comfy, request))
        assert images["13"].shape == (48, 48, 3)  # the upscaled latents, decoded

    run(store, scenario)


def test_start_at_step_on_encoded_pixels_is_img2img_on_the_schedules_tail(store: Path) -> None:
    """Krita AI Diffusion's img2img: VAEEncode -> KSamplerAdvanced(steps 8, start_at_step 4) runs
    sigmas[4:] of the 8-step schedule: /sample's img2img with steps 4, denoise 0.5."""

    async def scenario(comfy: Comfy) -> None:
        first = open_webui("sd1", "a red cat", 32, 32, 1, 3, 4)
        start = await image_of(comfy, first)
        wf = open_webui("sd1", "a red cat", 32, 32, 1, 3, 4)
        wf["10"] = {"class_type": "ETN_LoadImageBase64", "inputs": {"image": _b64(start)}}
        wf["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
        wf["3"] = advanced(["11", 0], noise_seed=7, steps=8, start_at_step=4)
        got = await image_of(comfy, wf)
        init = GatedImage(_pil(start), "init_image")
        request = GenerationRequest(
            model="sd1", seed=7, steps=4, denoise=0.5, width=32, height=32, init_image=init, **TINY
        )
        assert np.array_equal(got, await service_image(comfy, request))

    run(store, scenario)


def test_latent_from_batch_keeps_each_images_noise(store: Path) -> None:
    """ComfyUI's way to make one image of a batch again: EmptyLatentImage(batch 3) ->
    LatentFromBatch(2, 1) -> KSampler is the batch's third image (its batch_index picks its noise);
    LatentFromBatch of a sampled batch hands on that image's latents."""

    async def scenario(comfy: Comfy) -> None:
        batch = open_webui("digits", "a 3", 16, 16, 3, 4, 50)
        ctx = MemoryContext()
        r = await comfy.run(batch, "b", ctx)
        whole = [
            pixels(ctx.files[(i["type"], i["subfolder"], i["filename"])]) for i in r.outputs["9"]["images"]
        ]
        assert len(whole) == 3 and not np.array_equal(whole[1], whole[2])
        # LatentFromBatch between the empty latent and the sampler, or after the sampler
        for source, reader, index in (("5", ("3", "latent_image"), 2), ("3", ("8", "samples"), 1)):
            wf = open_webui("digits", "a 3", 16, 16, 3, 4, 50)
            inputs = {"samples": [source, 0], "batch_index": index, "length": 1}
            wf["10"] = {"class_type": "LatentFromBatch", "inputs": inputs}
            wf[reader[0]]["inputs"][reader[1]] = ["10", 0]
            assert np.array_equal(await image_of(comfy, wf), whole[index])

    run(store, scenario)


def _pil(arr: np.ndarray) -> Any:
    from PIL import Image

    return Image.fromarray(arr)


def _b64(arr: np.ndarray) -> str:
    import base64
    import io

    buf = io.BytesIO()
    _pil(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_a_latent_start_is_stored_losslessly_for_the_state_dir() -> None:
    """KDIFF_STATE_DIR records every accepted request: its latents come back bit for bit."""
    import torch

    from service.serving.jobstore.codec import decode_request, encode_request
    from service.serving.latents import LatentInput

    start = LatentInput(torch.randn(2, 4, 4, 4), False, 1, 3, True, torch.rand(1, 32, 32))
    back = decode_request(encode_request(GenerationRequest(model="sd1", latent=start))).latent
    assert back is not None and back.samples is not None and back.noise_mask is not None
    assert torch.equal(back.samples, start.samples) and torch.equal(back.noise_mask, start.noise_mask)
    assert (back.add_noise, back.start_step, back.end_step, back.leftover_noise) == (False, 1, 3, True)

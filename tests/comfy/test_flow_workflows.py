"""ComfyUI's Flux and SD3 workflow shapes on the tiny flow models: the same image as the same request
through the service."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.comfy import Comfy
from service.comfy.testing import MemoryContext
from service.serving.request import GenerationRequest
from tests.support.flow_tiny import tiny_flow_store

from .conftest import pixels, run


@pytest.fixture(scope="module")
def flow_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("comfy-flow")
    for name in ("sd3", "flux_dev"):
        shutil.copytree(tiny_flow_store() / name, root / name)
    return root


def link(node: str, slot: int = 0) -> list[Any]:
    return [node, slot]


def flux_workflow(guidance: float, seed: int, scheduler: str) -> dict[str, Any]:
    """The shape of ComfyUI's Flux-dev example (separate loaders, FluxGuidance, custom sampling)."""
    n = {
        "unet": ("UNETLoader", {"unet_name": "flux_dev.safetensors", "weight_dtype": "default"}),
        "clip": ("DualCLIPLoader", {"clip_name1": "flux_dev", "clip_name2": "flux_dev", "type": "flux"}),
        "vae": ("VAELoader", {"vae_name": "flux_dev"}),
        "text": ("CLIPTextEncode", {"text": "the red cat", "clip": link("clip")}),
        "fg": ("FluxGuidance", {"conditioning": link("text"), "guidance": guidance}),
        "ms": (
            "ModelSamplingFlux",
            {"model": link("unet"), "max_shift": 1.15, "base_shift": 0.5, "width": 32, "height": 32},
        ),
        "lat": ("EmptySD3LatentImage", {"width": 32, "height": 32, "batch_size": 1}),
        "guider": ("BasicGuider", {"model": link("ms"), "conditioning": link("fg")}),
        "sampler": ("KSamplerSelect", {"sampler_name": "euler"}),
        "sigmas": (
            "BasicScheduler",
            {"model": link("ms"), "scheduler": scheduler, "steps": 3, "denoise": 1.0},
        ),
        "noise": ("RandomNoise", {"noise_seed": seed}),
        "run": (
            "SamplerCustomAdvanced",
            {
                "noise": link("noise"),
                "guider": link("guider"),
                "sampler": link("sampler"),
                "sigmas": link("sigmas"),
                "latent_image": link("lat"),
            },
        ),
        "dec": ("VAEDecode", {"samples": link("run"), "vae": link("vae")}),
        "save": ("SaveImage", {"images": link("dec"), "filename_prefix": "flux"}),
    }
    return {k: {"class_type": c, "inputs": i} for k, (c, i) in n.items()}


async def run_one(comfy: Comfy, wf: dict[str, Any]) -> np.ndarray:
    ctx = MemoryContext()
    r = await comfy.run(wf, "f", ctx)
    assert r.status_str == "success", r.error
    (image,) = r.outputs["save"]["images"]
    return pixels(ctx.files[(image["type"], image["subfolder"], image["filename"])])


async def service_image(comfy: Comfy, **fields: Any) -> np.ndarray:
    job = await comfy.service.generate(GenerationRequest(**fields))
    await job.wait_done()
    return pixels(job.result.pngs[0])


def test_flux_dev_workflow_is_the_sample_image(flow_store: Path) -> None:
    async def scenario(comfy: Comfy) -> None:
        got = await run_one(comfy, flux_workflow(2.0, 9, "simple"))
        common = {"model": "flux_dev", "prompt": "the red cat", "sampler": "euler", "steps": 3, "seed": 9}
        size = {"width": 32, "height": 32, "cfg_scale": 1.0}
        want = await service_image(comfy, **common, **size, schedule="simple", guidance=2.0)
        assert got.shape == (32, 32, 3) and np.array_equal(got, want)
        other = await service_image(comfy, **common, **size, schedule="simple", guidance=5.0)
        assert not np.array_equal(got, other)  # FluxGuidance reached the model

    run(flow_store, scenario, models=["flux_dev"])


def test_sd3_checkpoint_workflow_with_model_sampling_shift(flow_store: Path) -> None:
    """CheckpointLoaderSimple -> ModelSamplingSD3 -> KSampler on SD3: the shift is the 'flow'
    schedule's (our request's ``shift``)."""

    async def scenario(comfy: Comfy) -> None:
        from .workflows import open_webui

        wf = open_webui("sd3", "the red cat", 32, 32, 1, 3, 21, negative="a dog")
        wf["3"]["inputs"].update(cfg=4.0, scheduler="flow", sampler_name="dpmpp_2m")
        wf["20"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["4", 0], "shift": 2.0}}
        wf["3"]["inputs"]["model"] = ["20", 0]
        got = await run_one_save(comfy, wf)
        fields = {"model": "sd3", "prompt": "the red cat", "negative_prompt": "a dog", "cfg_scale": 4.0}
        fields |= {
            "sampler": "dpmpp_2m",
            "schedule": "flow",
            "steps": 3,
            "seed": 21,
            "width": 32,
            "height": 32,
        }
        assert np.array_equal(got, await service_image(comfy, **fields, shift=2.0))
        assert not np.array_equal(got, await service_image(comfy, **fields, shift=3.0))

    run(flow_store, scenario, models=["sd3"])


async def run_one_save(comfy: Comfy, wf: dict[str, Any]) -> np.ndarray:
    wf["save"] = wf.pop("9")
    return await run_one(comfy, wf)


def test_sd3_halves_with_leftover_noise_are_one_run(flow_store: Path) -> None:
    """The base + refiner split on a flow model: the first half's latents are handed on as ComfyUI's
    x / (1 - t) and the second half's (1 - t) x start gives them back, so the two halves are the
    one 4-step euler run to within float rounding (at most one 8-bit level)."""

    async def scenario(comfy: Comfy) -> None:
        from .workflows import open_webui

        def sd3(steps_end: int | None) -> dict[str, Any]:
            wf = open_webui("sd3", "the red cat", 32, 32, 1, 4, 21, negative="a dog")
            wf["3"]["inputs"].update(cfg=4.0, scheduler="flow", sampler_name="euler")
            if steps_end is None:
                return wf
            ks = wf.pop("3")["inputs"]
            common = {k: ks[k] for k in ("model", "positive", "negative", "cfg", "steps", "sampler_name")}
            common |= {"scheduler": "flow", "noise_seed": 21, "return_with_leftover_noise": "enable"}
            first = {"add_noise": "enable", "start_at_step": 0, "end_at_step": steps_end}
            second = {"add_noise": "disable", "start_at_step": steps_end, "end_at_step": 10000}
            wf["20"] = {
                "class_type": "KSamplerAdvanced",
                "inputs": common | first | {"latent_image": ["5", 0]},
            }
            wf["21"] = {
                "class_type": "KSamplerAdvanced",
                "inputs": common | second | {"latent_image": ["20", 0]},
            }
            wf["9"]["inputs"]["images"] = ["8", 0]
            wf["8"]["inputs"]["samples"] = ["21", 0]
            return wf

        whole = await run_one_save(comfy, sd3(None))
        halves = await run_one_save(comfy, sd3(2))
        assert np.abs(whole.astype(int) - halves.astype(int)).max() <= 1
        assert whole.std() > 1  # an image, not a constant

    run(flow_store, scenario, models=["sd3"])

"""ComfyUI's ControlNet wiring on a Flux model (its Flux-dev example's loaders and custom sampling,
ControlNetLoader -> ControlNetApplyAdvanced with the optional VAE, as ComfyUI's Flux ControlNet
examples wire it) is /sample's ``controlnets`` unit on the tiny Flux-dev (pixel-equal), and the unit
acts."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.comfy import Comfy
from service.image_gate import GatedImage
from service.serving.request import ControlNetRef
from tests.support.flux_controlnet_tiny import flux_controlnet_store

from .conftest import run
from .test_controlnet_nodes import b64
from .test_flow_workflows import flux_workflow, link, run_one, service_image

SIZE = 32  # the Flux workflow's size (4 x 4 latents at 8 px each: 4 tokens)


@pytest.fixture(scope="module")
def store() -> Path:
    return flux_controlnet_store()[0]


def control_image() -> Image.Image:
    arr = np.zeros((SIZE, SIZE, 3), np.uint8)
    arr[8:24, 6:26] = 255
    return Image.fromarray(arr)


def workflow(strength: float, net: str = "fcn_a", union_type: str | None = None) -> dict[str, Any]:
    wf = flux_workflow(2.0, 9, "simple")
    wf["unet"]["inputs"]["unet_name"] = "fluxcn.safetensors"
    wf["clip"]["inputs"].update(clip_name1="fluxcn", clip_name2="fluxcn")
    wf["vae"]["inputs"]["vae_name"] = "fluxcn"
    wf["cnl"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": net}}
    if union_type is not None:
        wf["typ"] = {
            "class_type": "SetUnionControlNetType",
            "inputs": {"control_net": link("cnl"), "type": union_type},
        }
    wf["img"] = {"class_type": "ETN_LoadImageBase64", "inputs": {"image": b64(control_image())}}
    wf["cn"] = {
        "class_type": "ControlNetApplyAdvanced",
        "inputs": {
            "positive": link("fg"),
            "negative": link("fg"),
            "control_net": link("typ" if union_type is not None else "cnl"),
            "image": link("img"),
            "strength": strength,
            "start_percent": 0.0,
            "end_percent": 1.0,
            "vae": link("vae"),
        },
    }
    wf["guider"]["inputs"]["conditioning"] = link("cn")
    return wf


def test_flux_controlnet_workflow_is_the_sample_unit(store: Path) -> None:
    async def scenario(comfy: Comfy) -> None:
        got = await run_one(comfy, workflow(0.7))
        unit = ControlNetRef(
            "fcn_a", GatedImage(control_image(), "image"), 0.7, 0.0, 1.0, resize_mode="crop_and_resize"
        )
        common = {"model": "fluxcn", "prompt": "the red cat", "sampler": "euler", "steps": 3, "seed": 9}
        size = {"width": SIZE, "height": SIZE, "cfg_scale": 1.0, "schedule": "simple", "guidance": 2.0}
        want = await service_image(comfy, **common, **size, controlnets=[unit])
        assert np.array_equal(got, want)
        plain = await service_image(comfy, **common, **size)
        assert not np.array_equal(got, plain)  # the unit acted
        # a Flux union model's type from SetUnionControlNetType, read by its meaning (openpose: pose)
        got = await run_one(comfy, workflow(0.7, "fcn_union", "openpose"))
        unit = replace(unit, model="fcn_union", control_type="pose")
        assert np.array_equal(got, await service_image(comfy, **common, **size, controlnets=[unit]))

    run(store, scenario, models=["fluxcn"])

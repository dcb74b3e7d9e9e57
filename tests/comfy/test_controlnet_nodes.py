"""ComfyUI's ControlNet nodes on our ControlNet units: ControlNetLoader lists the store's
ControlNets; ControlNetApplyAdvanced (strength, start_percent, end_percent) and ControlNetApply are
/sample's ``controlnets`` unit (weight, guidance_start, guidance_end, the image centre-cropped to the
size), pixel-equal; an unknown ControlNet is ComfyUI's value_not_in_list node error."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.comfy import Comfy
from service.image_gate import GatedImage
from service.serving.request import ControlNetRef, GenerationRequest
from tests.support.controlnet_tiny import add_controlnets

from .conftest import run
from .test_latents import image_of, service_image
from .workflows import open_webui


@pytest.fixture(scope="module")
def cn_store(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The comfy tests' store plus the tiny ControlNets (cn_a, cn_b, an original single file, cn_xl)."""
    out = tmp_path_factory.mktemp("cn") / "store"
    shutil.copytree(store, out)
    add_controlnets(out)
    return out


def control_png() -> Image.Image:
    """A 48x32 edge-like control image (not the generation's aspect: it is centre-cropped)."""
    arr = np.zeros((32, 48, 3), np.uint8)
    arr[8:24, 10:38] = 255
    arr[12:20, 16:32] = 0
    return Image.fromarray(arr)


def b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def controlnet_workflow(name: str, advanced: bool = True, **unit: Any) -> dict[str, Any]:
    """Open WebUI's workflow with ComfyUI's ControlNet wiring (LoadImage -> ControlNetApply ->
    KSampler), the control image sent as ETN_LoadImageBase64."""
    wf = open_webui("sd1", "a red cat", 32, 32, 1, 4, 9)
    wf["3"]["inputs"].update(sampler_name="euler", scheduler="karras")
    wf["20"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": name}}
    wf["21"] = {"class_type": "ETN_LoadImageBase64", "inputs": {"image": b64(control_png())}}
    inputs: dict[str, Any] = {"control_net": ["20", 0], "image": ["21", 0], "strength": 0.8}
    if advanced:
        inputs |= {"positive": ["6", 0], "negative": ["7", 0], "start_percent": 0.0, "end_percent": 0.5}
        wf["22"] = {"class_type": "ControlNetApplyAdvanced", "inputs": inputs | unit}
        wf["3"]["inputs"].update(positive=["22", 0], negative=["22", 1])
    else:
        wf["22"] = {"class_type": "ControlNetApply", "inputs": inputs | {"conditioning": ["6", 0]} | unit}
        wf["3"]["inputs"]["positive"] = ["22", 0]
    return wf


def unit_request(**unit: Any) -> GenerationRequest:
    cn = ControlNetRef(image=GatedImage(control_png(), "image"), resize_mode="crop_and_resize", **unit)
    fields = {"prompt": "a red cat", "cfg_scale": 8.0, "sampler": "euler", "schedule": "karras"}
    return GenerationRequest(model="sd1", seed=9, steps=4, width=32, height=32, controlnets=[cn], **fields)


def test_controlnet_nodes_are_our_units(cn_store: Path) -> None:
    async def scenario(comfy: Comfy) -> None:
        info = comfy.object_info()
        names = info["ControlNetLoader"]["input"]["required"]["control_net_name"][0]
        assert {"cn_a", "cn_b", "control_v11p_sd15_tiny", "cn_xl"} <= set(names)
        assert comfy.model_folders()["controlnet"] == names
        adv = await image_of(comfy, controlnet_workflow("cn_a"))
        want = unit_request(model="cn_a", weight=0.8, guidance_start=0.0, guidance_end=0.5)
        assert np.array_equal(adv, await service_image(comfy, want))
        # ComfyUI's file spelling of an original single file; the old node acts over all steps
        old = await image_of(comfy, controlnet_workflow("control_v11p_sd15_tiny.safetensors", False))
        want = unit_request(model="control_v11p_sd15_tiny", weight=0.8)
        assert np.array_equal(old, await service_image(comfy, want))
        plain = open_webui("sd1", "a red cat", 32, 32, 1, 4, 9)
        plain["3"]["inputs"].update(sampler_name="euler", scheduler="karras")
        assert not np.array_equal(adv, await image_of(comfy, plain))  # the unit did act
        v = comfy.validate(controlnet_workflow("control_v11p_sd15_openpose"))  # not in the store
        assert not v.ok and v.error["type"] == "prompt_outputs_failed_validation"
        (err,) = v.node_errors["20"]["errors"]
        assert err["type"] == "value_not_in_list" and err["message"] == "Value not in list"
        assert err["details"].startswith("control_net_name: 'control_v11p_sd15_openpose' not in ")
        assert v.node_errors["20"]["class_type"] == "ControlNetLoader"

    run(cn_store, scenario)

"""ComfyUI's SetUnionControlNetType (core, conditioning/controlnet: ``control_net`` and ``type`` in
["auto", *UNION_CONTROLNET_TYPES]) between ControlNetLoader and ControlNetApplyAdvanced on a union
ControlNet (ControlNet-Union SDXL): the unit of /sample's ``controlnets`` with that ``control_type``,
pixel-equal; "auto" is the unit without a type."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")

from service.comfy import Comfy  # noqa: E402
from service.image_gate import GatedImage  # noqa: E402
from service.models.controlnet.union import COMFY_TYPES  # noqa: E402
from service.serving.request import ControlNetRef, GenerationRequest  # noqa: E402
from tests.support.union_tiny import union_store  # noqa: E402

from .conftest import run  # noqa: E402
from .test_controlnet_nodes import b64, control_png  # noqa: E402
from .test_latents import image_of, service_image  # noqa: E402
from .workflows import open_webui  # noqa: E402


@pytest.fixture(scope="module")
def sdxl_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("union-comfy")
    union_store(root, sd1=False)
    return root


def union_workflow(kind: str) -> dict[str, Any]:
    wf = open_webui("sdxl", "a red cat", 64, 64, 1, 3, 9)
    wf["3"]["inputs"].update(sampler_name="euler", scheduler="karras")
    wf["20"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "union_promax"}}
    wf["23"] = {"class_type": "SetUnionControlNetType", "inputs": {"control_net": ["20", 0], "type": kind}}
    wf["21"] = {"class_type": "ETN_LoadImageBase64", "inputs": {"image": b64(control_png())}}
    inputs = {"control_net": ["23", 0], "image": ["21", 0], "strength": 0.8, "start_percent": 0.0}
    inputs |= {"positive": ["6", 0], "negative": ["7", 0], "end_percent": 1.0}
    wf["22"] = {"class_type": "ControlNetApplyAdvanced", "inputs": inputs}
    wf["3"]["inputs"].update(positive=["22", 0], negative=["22", 1])
    return wf


def unit_request(kind: str) -> GenerationRequest:
    image = GatedImage(control_png(), "image")
    cn = ControlNetRef("union_promax", image, 0.8, resize_mode="crop_and_resize", control_type=kind)
    fields = {"prompt": "a red cat", "cfg_scale": 8.0, "sampler": "euler", "schedule": "karras"}
    return GenerationRequest(model="sdxl", seed=9, steps=3, width=64, height=64, controlnets=[cn], **fields)


def test_set_union_controlnet_type_is_our_control_type(sdxl_store: Path) -> None:
    async def scenario(comfy: Comfy) -> None:
        spec = comfy.object_info()["SetUnionControlNetType"]
        assert spec["input"]["required"]["type"][0] == ["auto", *COMFY_TYPES]
        assert spec["output"] == ["CONTROL_NET"] and spec["category"] == "conditioning/controlnet"
        canny = await image_of(comfy, union_workflow("canny/lineart/anime_lineart/mlsd"))
        assert np.array_equal(canny, await service_image(comfy, unit_request("canny")))
        auto = await image_of(comfy, union_workflow("auto"))
        assert np.array_equal(auto, await service_image(comfy, unit_request("auto")))
        assert not np.array_equal(canny, auto)  # the type reached the network
        v = comfy.validate(union_workflow("fisheye"))
        assert not v.ok and v.node_errors["23"]["errors"][0]["type"] == "value_not_in_list"

    run(sdxl_store, scenario, models=["sdxl"])

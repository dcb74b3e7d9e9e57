"""LoraLoader: the request's LoRA (by name and weight), as /sample's ``loras``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.comfy import Comfy
from service.comfy.testing import MemoryContext
from service.models.store import ModelStore
from service.serving.request import GenerationRequest, LoraRef
from tests.support.lora_files import every_layer, kohya_state, random_layers, save
from tests.support.tiny_store import make_tiny_store

from .conftest import pixels, run
from .workflows import open_webui


def test_lora_loader_is_the_requests_lora(tmp_path: Path) -> None:
    make_tiny_store(tmp_path, name="tiny")
    unet = ModelStore(tmp_path).load("tiny").denoiser.inner_model
    lora = kohya_state({"unet": random_layers(unet, 4, 1, every_layer, std=0.6)}, 2.0)
    save(lora, tmp_path / "loras" / "ink.safetensors")

    async def scenario(comfy: Comfy) -> None:
        assert comfy.object_info()["LoraLoader"]["input"]["required"]["lora_name"][0] == ["ink"]
        wf = open_webui("tiny", "a 6", 64, 64, 1, 4, 3)
        links = {"model": ["4", 0], "clip": ["4", 1]}
        weights = {"strength_model": 0.7, "strength_clip": 0.7}
        wf["10"] = {
            "class_type": "LoraLoader",
            "inputs": {**links, "lora_name": "ink.safetensors", **weights},
        }
        wf["3"]["inputs"]["model"] = ["10", 0]
        wf["6"]["inputs"]["clip"] = wf["7"]["inputs"]["clip"] = ["10", 1]
        wrong = await comfy.run(
            {**wf, "10": {**wf["10"], "inputs": {**wf["10"]["inputs"], "lora_name": "x"}}},
            "w",
            ctx := MemoryContext(),
        )
        assert (
            "node 10 (LoraLoader): Value not in list: lora_name: 'x' not in ['ink']"
            in wrong.error["exception_message"]
        )
        r = await comfy.run(wf, "l", ctx)
        assert r.status_str == "success", r.error
        (image,) = r.outputs["9"]["images"]
        got = pixels(ctx.files[(image["type"], image["subfolder"], image["filename"])])
        fields = {
            "model": "tiny",
            "class_label": 6,
            "cfg_scale": 8.0,
            "sampler": "euler",
            "steps": 4,
            "seed": 3,
        }
        fields["schedule"] = "exponential"  # 'normal' on a continuous-time model
        for loras, same in (([LoraRef("ink", 0.7)], True), (None, False)):
            job = await comfy.service.generate(GenerationRequest(**fields, loras=loras))
            await job.wait_done()
            assert np.array_equal(got, pixels(job.result.pngs[0])) == same

    run(tmp_path, scenario, models=["tiny"])

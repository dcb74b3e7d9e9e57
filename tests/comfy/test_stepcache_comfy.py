"""Step-cache nodes in a ComfyUI workflow (DeepCache, WaveSpeed's ApplyFBCacheOnModel): the patched
MODEL samples what /sample gives for the same request with ``cache``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from service.comfy import Comfy
from service.comfy.testing import MemoryContext
from service.models.stepcache import CacheSpec
from service.serving.request import GenerationRequest

from .conftest import pixels, run
from .workflows import open_webui


async def _deepcache_is_the_request(
    comfy: Comfy, wf: dict[str, Any], fields: dict[str, Any], levels_matter: bool
) -> None:
    """``wf`` with the DeepCache node (interval 2, depth 3) before its KSampler gives the image of the
    request ``fields`` with that cache (level 3), and not the one without; ``levels_matter``: another
    level gives another image (SD UNets; the project's digits UNet has one split)."""
    # every input, as a saved workflow (API format) of the real node carries them
    deep = {"cache_interval": 2, "cache_depth": 3, "start_step": 0, "end_step": 1000}
    wf["20"] = {"class_type": "DeepCache", "inputs": {"model": ["4", 0], **deep}}
    wf["3"]["inputs"]["model"] = ["20", 0]
    ctx = MemoryContext()
    r = await comfy.run(wf, "p", ctx)
    assert r.status_str == "success", r.error
    (image,) = r.outputs["9"]["images"]
    got = pixels(ctx.files[(image["type"], image["subfolder"], image["filename"])])
    other = CacheSpec("deepcache", interval=2, level=1)
    for cache, same in (
        (CacheSpec("deepcache", interval=2, level=3), True),
        (None, False),
        (other, not levels_matter),
    ):
        job = await comfy.service.generate(GenerationRequest(**fields, cache=cache))
        await job.wait_done()
        assert np.array_equal(pixels(job.result.pngs[0]), got) is same


def test_deepcache_node_is_the_requests_cache(store: Path) -> None:
    async def scenario(comfy: Comfy) -> None:
        wf = open_webui("digits", "a handwritten 7", 512, 512, 1, 6, 1234)
        fields = {"model": "digits", "class_label": 7, "cfg_scale": 8.0, "sampler": "euler", "steps": 6}
        await _deepcache_is_the_request(comfy, wf, fields | {"schedule": "exponential", "seed": 1234}, False)
        # First-Block-Cache is for transformers: on this UNet the prompt is refused naming the field
        fb = {"object_to_patch": "diffusion_model", "residual_diff_threshold": 0.12, "start": 0.0, "end": 1.0}
        fb["max_consecutive_cache_hits"] = -1
        wf["20"] = {"class_type": "ApplyFBCacheOnModel", "inputs": {"model": ["4", 0], **fb}}
        bad = await comfy.run(wf, "q", MemoryContext())
        assert bad.status_str == "error" and "cache.method" in bad.error["exception_message"]

    run(store, scenario)


def test_deepcache_node_on_stable_diffusion(store: Path) -> None:
    """The same node on the tiny SD 1.x model (diffusers' UNet)."""

    async def scenario(comfy: Comfy) -> None:
        wf = open_webui("sd1", "a red cat", 32, 32, 1, 4, 9)
        wf["3"]["inputs"].update(sampler_name="euler", scheduler="karras")
        fields = {"model": "sd1", "prompt": "a red cat", "cfg_scale": 8.0, "sampler": "euler", "seed": 9}
        await _deepcache_is_the_request(
            comfy, wf, fields | {"schedule": "karras", "steps": 4, "width": 32, "height": 32}, True
        )

    run(store, scenario)

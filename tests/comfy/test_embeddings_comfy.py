"""Textual-inversion embeddings in ComfyUI workflows: SillyTavern's default workflow with ComfyUI's
``embedding:name`` in its CLIPTextEncode texts gives /sample's image for the same prompt (the A1111
spelling), the embedding changes the image, and a name that is no usable embedding fails the run
as ComfyUI reports a node's failure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.comfy import Comfy
from service.comfy.testing import MemoryContext
from service.serving.request import GenerationRequest
from tests.support.embedding_files import a1111_pt, emb_params, vectors
from tests.support.sd_tiny import digits_and_tiny_sd_store

from .conftest import pixels, run
from .workflows import SILLYTAVERN_DEFAULT, sillytavern


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = digits_and_tiny_sd_store(tmp_path_factory.mktemp("comfy-embedding-store"))
    a1111_pt(root / "embeddings" / "emb.pt", vectors(6, 32, 1, std=2.0))
    emb_params(root / "sd1" / "embeddings" / "neg.safetensors", vectors(4, 32, 2, std=2.0))
    return root


def _workflow(prompt: str, negative: str) -> dict[str, Any]:
    return sillytavern(SILLYTAVERN_DEFAULT, scale=20.0, sampler="euler", scheduler="karras", seed=5, steps=3,
                       model="sd1.safetensors", width=64, height=64, prompt=prompt,
                       negative_prompt=negative)  # fmt: skip


def test_comfyui_embedding_spelling_in_workflows(store: Path) -> None:
    async def image(comfy: Comfy, prompt: str, negative: str) -> np.ndarray:
        ctx = MemoryContext()
        r = await comfy.run(_workflow(prompt, negative), "te", ctx)
        assert r.status_str == "success", r.error
        (out,) = [ctx.files[(i["type"], i["subfolder"], i["filename"])] for i in r.outputs["9"]["images"]]
        return pixels(out)

    async def scenario(comfy: Comfy) -> None:
        got = await image(comfy, "a red embedding:emb cat", "embedding:neg.safetensors, the dog")
        request = GenerationRequest(model="sd1", prompt="a red emb cat", negative_prompt="neg, the dog",
                                    cfg_scale=20.0, sampler="euler", schedule="karras", steps=3, seed=5,
                                    width=64, height=64)  # fmt: skip
        job = await comfy.service.generate(request)
        await job.wait_done()
        assert np.array_equal(got, pixels(job.result.pngs[0]))  # the same embeddings as by name
        plain = await image(comfy, "a red cat", "the dog")
        assert np.abs(got.astype(int) - plain.astype(int)).max() > 10  # and they act
        ctx = MemoryContext()
        r = await comfy.run(_workflow("a embedding:missing cat", ""), "bad", ctx)
        assert r.status_str == "error" and "embedding:missing" in r.error["exception_message"]

    run(store, scenario, models=["sd1"])

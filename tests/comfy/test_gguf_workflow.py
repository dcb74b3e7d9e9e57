"""A Flux workflow as ComfyUI-GGUF users save it (city96's UnetLoaderGGUF + DualCLIPLoaderGGUF naming
``flux1-dev-F16.gguf``) on a store model whose weights are that GGUF: the same image as the
service's own request on that model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from service.comfy import Comfy
from tests.support.flow_single_file import flux_to_original
from tests.support.flow_tiny import tiny_flow_store
from tests.support.gguf_files import write_gguf

from .conftest import run
from .test_flow_workflows import flux_workflow, run_one, service_image

NAME = "flux1-dev-F16"  # city96 ships one; the tiny model's 16-wide rows take no block type


def _store(root: Path) -> Path:
    from diffusers import FluxTransformer2DModel

    src = tiny_flow_store() / "flux_dev"
    folder = root / NAME
    shutil.copytree(src, folder / "config")
    for f in (folder / "config" / "transformer").glob("*.safetensors"):
        f.unlink()
    tr = FluxTransformer2DModel.from_pretrained(str(src / "transformer"))
    sd = flux_to_original({k: v.detach().clone() for k, v in tr.state_dict().items()})
    write_gguf(folder / f"{NAME}.gguf", sd, "F16", "flux")
    manifest = json.loads((src / "manifest.json").read_text())
    manifest |= {"name": NAME, "weights": f"{NAME}.gguf", "config": "config"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_comfyui_gguf_loader_nodes_run_the_gguf_model(tmp_path: Path) -> None:
    wf = flux_workflow(2.0, 9, "simple")
    wf["unet"] = {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": f"{NAME}.gguf"}}
    wf["clip"] = {
        "class_type": "DualCLIPLoaderGGUF",
        "inputs": {"clip_name1": f"{NAME}.gguf", "clip_name2": f"{NAME}.gguf", "type": "flux"},
    }
    wf["vae"]["inputs"]["vae_name"] = NAME

    async def scenario(comfy: Comfy) -> None:
        loaded = await comfy.service.pool.ensure_loaded(NAME)  # the GGUF, kept quantized
        assert loaded.info["quantization"]["F16"] > 0
        got = await run_one(comfy, wf)
        common = {"model": NAME, "prompt": "the red cat", "sampler": "euler", "steps": 3, "seed": 9}
        want = await service_image(comfy, **common, width=32, height=32, cfg_scale=1.0, schedule="simple",
                                   guidance=2.0)  # fmt: skip
        assert got.shape == (32, 32, 3) and np.array_equal(got, want)

    torch.manual_seed(0)
    run(_store(tmp_path), scenario, models=[NAME])

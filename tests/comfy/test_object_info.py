"""/object_info is generated from the node classes in ComfyUI's shape, with our models, samplers
and schedules as the enum lists; what SillyTavern and Open WebUI read from it is there."""

from __future__ import annotations

from pathlib import Path

from service.comfy import NODES, Comfy
from service.comfy.testing import MemoryContext

from .conftest import run

# the community step-cache nodes (issue 28: ComfyUI-DeepCache, WaveSpeed's First-Block-Cache)
STEP_CACHE_NODES = {"DeepCache", "ApplyFBCacheOnModel"}
ISSUE_NODES = {
    "CheckpointLoaderSimple",
    "CLIPTextEncode",
    "EmptyLatentImage",
    "KSampler",
    "KSamplerAdvanced",
    "VAEDecode",
    "VAEEncode",
    "SaveImage",
    "PreviewImage",
    "LoadImage",
    "ImageScale",
    "LatentUpscale",
    "LatentUpscaleBy",
    "LoraLoader",
    "CLIPSetLastLayer",
    "VAELoader",
    "UNETLoader",
    "DualCLIPLoader",
    "FluxGuidance",
    "ModelSamplingSD3",
    "ModelSamplingFlux",
    "SetLatentNoiseMask",
    "ConditioningCombine",
    "SamplerCustom",
    "SamplerCustomAdvanced",
    "KSamplerSelect",
    "BasicScheduler",
    "KarrasScheduler",
    "RandomNoise",
    "CFGGuider",
    "BasicGuider",
    "ETN_LoadImageBase64",
}
CONTROLNET_NODES = {  # issue 26
    "ControlNetLoader",
    "ControlNetApply",
    "ControlNetApplyAdvanced",
    "SetUnionControlNetType",
}
MORE_NODES = {"EmptySD3LatentImage", "LatentFromBatch"}
GGUF_NODES = {"UnetLoaderGGUF", "UnetLoaderGGUFAdvanced", "DualCLIPLoaderGGUF"}  # city96's ComfyUI-GGUF
IPADAPTER_NODES = {
    "IPAdapterModelLoader",
    "CLIPVisionLoader",
    "IPAdapterUnifiedLoader",
    "IPAdapter",
    "IPAdapterAdvanced",
    "PrepImageForClipVision",
}
KEYS = {
    "input",
    "input_order",
    "output",
    "output_is_list",
    "output_name",
    "name",
    "display_name",
    "description",
    "python_module",
    "category",
    "output_node",
}


def test_object_info_shape_and_lists(store: Path) -> None:
    async def scenario(comfy: Comfy) -> None:
        ctx = MemoryContext()
        ctx.files[("input", "", "cat.png")] = b""
        info = comfy.object_info(ctx)
        known = ISSUE_NODES | CONTROLNET_NODES | MORE_NODES | STEP_CACHE_NODES | IPADAPTER_NODES | GGUF_NODES
        assert set(info) == known == set(NODES)
        for name, entry in info.items():
            assert set(entry) == KEYS and entry["name"] == name
            assert entry["input_order"]["required"] == list(entry["input"]["required"])
            assert len(entry["output"]) == len(entry["output_name"]) == len(entry["output_is_list"])
        # what SillyTavern reads without optional chaining (src/endpoints/stable-diffusion.js)
        assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == ["digits", "sd1"]
        assert info["UNETLoader"]["input"]["required"]["unet_name"][0] == ["digits", "sd1"]
        assert info["VAELoader"]["input"]["required"]["vae_name"][0] == ["digits", "sd1"]
        ks = info["KSampler"]["input"]["required"]
        assert ks["sampler_name"][0][:3] == ["euler", "euler_cfg_pp", "euler_ancestral"]
        assert "dpmpp_2m" in ks["sampler_name"][0] and "uni_pc_bh2" in ks["sampler_name"][0]
        assert ks["scheduler"][0][:2] == ["normal", "karras"] and ks["scheduler"][1]["default"] == "normal"
        assert ks["seed"] == [
            "INT",
            {"default": 0, "min": 0, "max": 2**64 - 1, "step": 1, "control_after_generate": True},
        ]
        assert ks["steps"][1]["max"] == comfy.service.settings.max_steps
        assert info["KSampler"]["input_order"]["required"] == [
            "model",
            "seed",
            "steps",
            "cfg",
            "sampler_name",
            "scheduler",
            "positive",
            "negative",
            "latent_image",
            "denoise",
        ]
        assert (
            info["EmptyLatentImage"]["input"]["required"]["batch_size"][1]["max"]
            == comfy.service.settings.max_images
        )
        assert info["LoadImage"]["input"]["required"]["image"] == [
            ["cat.png"],
            {"default": "cat.png", "image_upload": True},
        ]
        assert info["SaveImage"]["output_node"] and info["SaveImage"]["output"] == []
        assert info["CheckpointLoaderSimple"]["output"] == ["MODEL", "CLIP", "VAE"]
        assert comfy.object_info_one("KSampler") == {"KSampler": info["KSampler"]}
        assert comfy.object_info_one("Nope") == {}
        assert comfy.model_folders()["checkpoints"] == ["digits", "sd1"]
        assert info["ControlNetLoader"]["input"]["required"]["control_net_name"] == [[]]  # none here

    run(store, scenario)


def test_loader_lists_are_there_when_empty(tmp_path: Path, store: Path) -> None:
    """UNETLoader / VAELoader with no models: empty lists, never missing."""
    import shutil

    only = tmp_path / "store"
    shutil.copytree(store / "digits", only / "digits")

    async def scenario(comfy: Comfy) -> None:
        (only / "digits" / "manifest.json").unlink()  # the store is now empty
        comfy.service.pool.refresh()
        comfy.service.pool.models.clear()
        info = comfy.object_info()
        assert info["UNETLoader"]["input"]["required"]["unet_name"][0] == []
        assert info["VAELoader"]["input"]["required"]["vae_name"][0] == []
        assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == []

    run(only, scenario)


def test_every_nodes_defaults_are_valid_values(store: Path) -> None:
    """A client that fills a node from /object_info's defaults gets values that validate."""
    from service.comfy.node import Catalog

    async def scenario(comfy: Comfy) -> None:
        catalog = comfy.catalog()
        for name, cls in NODES.items():
            for field, spec in cls.inputs(catalog).items():
                if spec.choices is not None and spec.choices:
                    assert spec.default in spec.choices, (name, field)
                if spec.min is not None and spec.default is not None:
                    assert spec.min <= spec.default <= spec.max, (name, field)
        assert isinstance(catalog, Catalog)

    run(store, scenario)


def test_unknown_checkpoints_rescan_the_store_once(store: Path) -> None:
    async def scenario(comfy: Comfy) -> None:
        pool = comfy.service.pool
        scans = 0
        refresh = pool.refresh

        def counted() -> object:
            nonlocal scans
            scans += 1
            return refresh()

        pool.refresh = counted  # type: ignore[method-assign]
        catalog = comfy.catalog()  # one validation's
        assert not any(catalog.resolves_model(f"m{i}.safetensors") for i in range(50))
        assert catalog.resolves_model("sd1.safetensors") and catalog.resolves_model("digits")
        assert scans == 1

    run(store, scenario)

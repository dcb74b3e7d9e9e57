"""ComfyUI IP-Adapter workflows (cubiq's ComfyUI_IPAdapter_plus nodes and core CLIPVisionLoader, in
the API format ComfyUI's "Save (API format)" writes) on the tiny h94-layout adapters of
tests/support/ipadapter_tiny.py: pixel-equal to /sample's request with the same ``ip_adapters``
units; two adapters chained are two units; what is missing or not served is ComfyUI's node error
naming the node and the input; the reference image goes through the image gate."""

from __future__ import annotations

import base64
import io
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")

from service.comfy import Comfy  # noqa: E402
from service.comfy import ipadapter_names as names  # noqa: E402
from service.comfy.executor import _nbytes  # noqa: E402
from service.comfy.nodes_clip_prep import prep_for_clip  # noqa: E402
from service.comfy.runtime import image_to_pil  # noqa: E402
from service.comfy.testing import MemoryContext  # noqa: E402
from service.comfy.values import IPAdapterUnit, ModelRef  # noqa: E402
from service.image_gate import GatedImage  # noqa: E402
from service.serving.request import GenerationRequest, IPAdapterRef  # noqa: E402
from tests.support.hostile_images import bomb_png  # noqa: E402
from tests.support.ipadapter_tiny import ip_store, save_adapter  # noqa: E402

from .conftest import pixels, run  # noqa: E402
from .test_latents import service_image  # noqa: E402
from .workflows import open_webui  # noqa: E402

VIT_H = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"  # the names cubiq's README has users save
VIT_G = "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors"
STEPS, SEED = 4, 9


@pytest.fixture(scope="module")
def ip_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny IP-Adapter store, plus a FaceID-layout file (tensor names of h94's
    ip-adapter-faceid_sd15: an MLP projection and LoRA'd attention) that no node may load."""
    out = tmp_path_factory.mktemp("ip") / "store"
    shutil.copytree(ip_store()[0], out)
    proj = {k: torch.zeros(4, 4) for k in ("proj.0.weight", "proj.2.weight", "norm.weight")}
    layers = {"0.to_q_lora.down.weight": torch.zeros(4, 4), "1.to_k_ip.weight": torch.zeros(4, 4)}
    save_adapter(out / "ipadapter" / "ip-adapter-faceid_sd15.safetensors", proj, layers)
    return out


def reference(seed: int, size: tuple[int, int] = (40, 56)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def workflow(*adapters: dict[str, Any]) -> dict[str, Any]:
    """Open WebUI's default workflow (ids 3..9) with IP-Adapter nodes between the checkpoint's MODEL
    and the KSampler, each a dict of node id -> node as ComfyUI exports it."""
    wf = open_webui("sd1", "a red cat", 32, 32, 1, STEPS, SEED, negative="the dog")
    wf["3"]["inputs"].update(sampler_name="euler", scheduler="karras", cfg=5.0)
    model: list[Any] = ["4", 0]
    for nodes in adapters:
        for node_id, entry in nodes.items():
            inputs = entry["inputs"]
            if inputs.get("model") == "MODEL":
                inputs["model"] = model
            if entry["class_type"] in ("IPAdapter", "IPAdapterAdvanced"):
                model = [node_id, 0]
            wf[node_id] = entry
    wf["3"]["inputs"]["model"] = model
    return wf


def load_image(node_id: str, name: str) -> dict[str, Any]:
    return {node_id: {"class_type": "LoadImage", "inputs": {"image": name, "upload": "image"}}}


def unified(preset: str, image: str, **inputs: Any) -> dict[str, Any]:
    """cubiq's examples/ipadapter_simple.json, as the API format: IPAdapterUnifiedLoader -> IPAdapter."""
    apply = {"weight": 0.8, "start_at": 0.0, "end_at": 1.0, "weight_type": "standard"} | inputs
    return load_image("13", image) | {
        "10": {"class_type": "IPAdapterUnifiedLoader", "inputs": {"model": "MODEL", "preset": preset}},
        "11": {
            "class_type": "IPAdapter",
            "inputs": apply | {"model": ["10", 0], "ipadapter": ["10", 1], "image": ["13", 0]},
        },
    }


def advanced(
    ids: tuple[str, str, str, str], file: str, clip: str, image: str, **inputs: Any
) -> dict[str, Any]:
    """cubiq's examples/ipadapter_advanced.json wiring: IPAdapterModelLoader + CLIPVisionLoader +
    LoadImage -> IPAdapterAdvanced (its widget values as the API format names them)."""
    loader, vision, img, apply = ids
    values = {"weight": 0.8, "weight_type": "linear", "combine_embeds": "concat", "start_at": 0.0}
    values |= {"end_at": 1.0, "embeds_scaling": "V only"} | inputs
    links = {"model": "MODEL", "ipadapter": [loader, 0], "image": [img, 0], "clip_vision": [vision, 0]}
    return load_image(img, image) | {
        loader: {"class_type": "IPAdapterModelLoader", "inputs": {"ipadapter_file": file}},
        vision: {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": clip}},
        apply: {"class_type": "IPAdapterAdvanced", "inputs": values | links},
    }


def request(*units: tuple[str, int, float, float, float]) -> GenerationRequest:
    """/sample's request for the workflow: each unit (adapter, image seed, weight, start, end)."""
    refs = [IPAdapterRef(a, GatedImage(reference(s), "image"), w, lo, hi) for a, s, w, lo, hi in units]
    fields = {"prompt": "a red cat", "negative_prompt": "the dog", "cfg_scale": 5.0}
    fields |= {"sampler": "euler", "schedule": "karras", "width": 32, "height": 32}
    return GenerationRequest(model="sd1", seed=SEED, steps=STEPS, ip_adapters=refs, **fields)


def context() -> MemoryContext:
    ctx = MemoryContext()
    for seed in (1, 2):
        ctx.files[("input", "", f"ref{seed}.png")] = png_bytes(reference(seed))
    return ctx


async def image_of(comfy: Comfy, wf: dict[str, Any]) -> np.ndarray:
    ctx = context()
    r = await comfy.run(wf, f"p{id(wf)}", ctx)
    assert r.status_str == "success", r.error
    (image,) = r.outputs["9"]["images"]
    return pixels(ctx.files[(image["type"], image["subfolder"], image["filename"])])


async def error_of(comfy: Comfy, wf: dict[str, Any]) -> dict[str, Any]:
    r = await comfy.run(wf, f"e{id(wf)}", context())
    assert r.status_str == "error" and r.error is not None
    return r.error


def test_object_info_lists_the_store_in_comfyuis_spelling(ip_root: Path) -> None:
    async def scenario(comfy: Comfy) -> None:
        info = comfy.object_info()
        files = info["IPAdapterModelLoader"]["input"]["required"]["ipadapter_file"][0]
        assert {"ip-adapter_sd15.safetensors", "ip-adapter-plus_sd15.bin"} <= set(files)
        assert "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors" in files
        clips = info["CLIPVisionLoader"]["input"]["required"]["clip_name"][0]
        assert clips == ["image_encoder", "sdxl_models/image_encoder", VIT_G, VIT_H]
        adv = info["IPAdapterAdvanced"]["input"]
        assert adv["required"]["weight"] == ["FLOAT", {"default": 1.0, "min": -1.0, "max": 5.0, "step": 0.05}]
        assert adv["required"]["embeds_scaling"][0] == [
            "V only",
            "K+V",
            "K+V w/ C penalty",
            "K+mean(V) w/ C penalty",
        ]
        assert list(adv["optional"]) == ["image_negative", "attn_mask", "clip_vision"]
        assert info["IPAdapterUnifiedLoader"]["output_name"] == ["model", "ipadapter"]
        assert info["IPAdapter"]["python_module"] == "custom_nodes.ComfyUI_IPAdapter_plus"
        assert info["CLIPVisionLoader"]["python_module"] == "nodes"  # core ComfyUI's
        assert comfy.model_folders()["ipadapter"] == files
        assert comfy.model_folders()["clip_vision"] == clips

    run(ip_root, scenario, models=["sd1"])


def test_h94_files_map_onto_cubiqs_presets() -> None:
    """h94/IP-Adapter's published file names (its models/ and sdxl_models/ folders) -> each preset."""
    h94 = [
        "models/ip-adapter-full-face_sd15.safetensors",
        "models/ip-adapter-plus-face_sd15.safetensors",
        "models/ip-adapter-plus_sd15.safetensors",
        "models/ip-adapter_sd15.safetensors",
        "models/ip-adapter_sd15_light.safetensors",
        "models/ip-adapter_sd15_light_v11.bin",
        "models/ip-adapter_sd15_vit-G.safetensors",
        "sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors",
        "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors",
        "sdxl_models/ip-adapter_sdxl.safetensors",
        "sdxl_models/ip-adapter_sdxl_vit-h.safetensors",
    ]
    listed = dict.fromkeys(h94, "")
    want = {
        ("LIGHT - SD1.5 only (low strength)", False): "models/ip-adapter_sd15_light_v11.bin",
        ("STANDARD (medium strength)", False): "models/ip-adapter_sd15.safetensors",
        ("STANDARD (medium strength)", True): "sdxl_models/ip-adapter_sdxl_vit-h.safetensors",
        ("VIT-G (medium strength)", False): "models/ip-adapter_sd15_vit-G.safetensors",
        ("VIT-G (medium strength)", True): "sdxl_models/ip-adapter_sdxl.safetensors",
        ("PLUS (high strength)", False): "models/ip-adapter-plus_sd15.safetensors",
        ("PLUS (high strength)", True): "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors",
        ("PLUS FACE (portraits)", False): "models/ip-adapter-plus-face_sd15.safetensors",
        ("PLUS FACE (portraits)", True): "sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors",
    }
    for (preset, sdxl), file in want.items():
        assert names.preset_file(preset, sdxl, listed) == file, (preset, sdxl)
    assert names.preset_file("LIGHT - SD1.5 only (low strength)", True, listed) is None
    # ComfyUI's clip_vision file names (cubiq's README and its patterns) -> our encoder folders
    enc = {"models/image_encoder": "models/image_encoder", VIT_H: "models/image_encoder"}
    assert names.encoder_folder("sd15_model.safetensors", enc) == "models/image_encoder"
    assert names.encoder_folder("CLIP-ViT-H-14-laion2B-s32B-b79K.bin", enc) == "models/image_encoder"
    assert names.encoder_folder(VIT_G, enc) is None  # no bigG encoder in this store


def test_unified_loader_and_ipadapter_equal_sample(ip_root: Path) -> None:
    """IPAdapterUnifiedLoader (STANDARD on SD 1.x: ip-adapter_sd15) + IPAdapter = one unit of /sample."""

    async def scenario(comfy: Comfy) -> None:
        wf = workflow(unified("STANDARD (medium strength)", "ref1.png", start_at=0.25))
        got = await image_of(comfy, wf)
        want = await service_image(comfy, request(("ip-adapter_sd15", 1, 0.8, 0.25, 1.0)))
        assert np.array_equal(got, want)
        # with cubiq's example's PrepImageForClipVision (LANCZOS, top, 0.15) between: /sample of that image
        wf["12"] = {"class_type": "PrepImageForClipVision", "inputs": {"image": ["13", 0]}}
        wf["12"]["inputs"] |= {"interpolation": "LANCZOS", "crop_position": "top", "sharpening": 0.15}
        wf["11"]["inputs"]["image"] = ["12", 0]
        prepped = await image_of(comfy, wf)
        square = np.asarray(reference(1), dtype=np.float32)[None] / 255
        cut = prep_for_clip(torch.from_numpy(square), "LANCZOS", "top", 0.15)[0]
        refs = [IPAdapterRef("ip-adapter_sd15", GatedImage(image_to_pil(cut), "image"), 0.8, 0.25, 1.0)]
        assert np.array_equal(prepped, await service_image(comfy, replace(request(), ip_adapters=refs)))
        assert not np.array_equal(prepped, got)
        plain = await service_image(comfy, request())
        assert np.abs(got.astype(int) - plain).max() > 0  # the adapter did act

    run(ip_root, scenario, models=["sd1"])


def test_two_adapters_chained_are_two_units(ip_root: Path) -> None:
    """IPAdapterModelLoader + CLIPVisionLoader + IPAdapterAdvanced, twice on one MODEL (the plus .bin
    on image 1 over the first half, the plain file on image 2): /sample with both units, in order."""

    async def scenario(comfy: Comfy) -> None:
        first = advanced(("20", "21", "22", "23"), "ip-adapter-plus_sd15.bin", VIT_H, "ref1.png", end_at=0.5)
        second = advanced(
            ("30", "31", "32", "33"), "ip-adapter_sd15.safetensors", "image_encoder", "ref2.png", weight=1.2
        )
        got = await image_of(comfy, workflow(first, second))
        units = (("ip-adapter-plus_sd15", 1, 0.8, 0.0, 0.5), ("ip-adapter_sd15", 2, 1.2, 0.0, 1.0))
        assert np.array_equal(got, await service_image(comfy, request(*units)))
        one = await service_image(comfy, request(units[0]))
        assert not np.array_equal(got, one)  # the second one acts too
        # the output cache bounds its bytes by what it holds: a MODEL's reference images count
        unit = IPAdapterUnit("ip-adapter_sd15", GatedImage(reference(1), "image"))
        assert _nbytes((ModelRef("sd1", ip_adapters=(unit, unit)),)) == 2 * 40 * 56 * 3

    run(ip_root, scenario, models=["sd1"])


def test_missing_and_unserved_are_node_errors(ip_root: Path) -> None:
    """At validation (POST /prompt's 400): a file not in the store, a FaceID file, a preset with no
    file or one not served, a weight type or embeds scaling we do not run, a bomb as the reference
    image. At execution: an SDXL adapter on an SD 1.x model, an encoder the adapter does not run with,
    an attention mask. Each names its node, its class and the input."""

    def errors(wf: dict[str, Any], node_id: str) -> list[dict[str, Any]]:
        v = comfy_.validate(wf)
        assert not v.ok and v.error is not None and v.error["type"] == "prompt_outputs_failed_validation"
        assert v.node_errors[node_id]["dependent_outputs"] == ["9"]
        return [(v.node_errors[node_id]["class_type"], e) for e in v.node_errors[node_id]["errors"]]

    async def scenario(comfy: Comfy) -> None:
        nonlocal comfy_
        comfy_ = comfy
        base = ("20", "21", "22", "23")
        wf = workflow(advanced(base, "ip-adapter-plus-face_sd15.safetensors", VIT_H, "ref1.png"))
        ((cls, err),) = errors(wf, "20")
        assert cls == "IPAdapterModelLoader" and err["type"] == "value_not_in_list"
        assert err["details"].startswith("ipadapter_file: 'ip-adapter-plus-face_sd15.safetensors' not in ")
        wf = workflow(advanced(base, "ip-adapter-faceid_sd15.safetensors", VIT_H, "ref1.png"))
        ((cls, err),) = errors(wf, "20")
        assert (
            err["type"] == "custom_validation_failed" and err["extra_info"]["input_name"] == "ipadapter_file"
        )
        assert "FaceID" in err["details"]
        wf = workflow(unified("PLUS FACE (portraits)", "ref1.png"))
        ((cls, err),) = errors(wf, "10")
        assert cls == "IPAdapterUnifiedLoader" and err["extra_info"]["input_name"] == "preset"
        assert "no file for it" in err["details"] and "plus.face.sd15" in err["details"]
        ((cls, err),) = errors(
            workflow(unified("FULL FACE - SD1.5 only (portraits stronger)", "ref1.png")), "10"
        )
        assert "not served" in err["details"]
        wf = workflow(advanced(base, "ip-adapter_sd15", VIT_H, "ref1.png", weight_type="style transfer"))
        wf["23"]["inputs"]["embeds_scaling"] = "K+V"
        found = {e["extra_info"]["input_name"]: e["details"] for _, e in errors(wf, "23")}
        assert found["weight_type"].endswith("supported: ['linear']")
        assert found["embeds_scaling"].endswith("supported: ['V only']")
        ((_, err),) = errors(
            workflow(unified("STANDARD (medium strength)", "ref1.png", weight_type="style transfer")), "11"
        )
        assert err["details"].endswith("supported: ['standard']")
        wf = workflow(advanced(base, "ip-adapter_sd15", VIT_H, "ref1.png"))
        wf["22"] = {
            "class_type": "ETN_LoadImageBase64",
            "inputs": {"image": base64.b64encode(bomb_png(12000, 12000)).decode()},
        }
        ((cls, err),) = errors(wf, "22")
        assert cls == "ETN_LoadImageBase64" and "pixels" in err["details"]

        # execution errors: the node that cannot apply it, its class and the input, in the message
        wf = workflow(advanced(base, "sdxl_models/ip-adapter_sdxl.safetensors", VIT_G, "ref1.png"))
        err = await error_of(comfy, wf)
        assert (err["node_id"], err["node_type"]) == ("23", "IPAdapterAdvanced")
        message = err["exception_message"]
        assert (
            message.startswith("ipadapter: IP-Adapter 'ip-adapter_sdxl' is for ")
            and "model 'sd1' is" in message
        )
        err = await error_of(comfy, workflow(advanced(base, "ip-adapter_sd15", VIT_G, "ref1.png")))
        assert err["node_id"] == "23" and err["exception_message"].startswith("clip_vision: ")
        assert "runs with the image encoder 'image_encoder'" in err["exception_message"]
        wf = workflow(advanced(base, "ip-adapter_sd15", VIT_H, "ref1.png"))
        wf["23"]["inputs"]["attn_mask"] = ["22", 1]  # LoadImage's MASK
        err = await error_of(comfy, wf)
        assert err["node_id"] == "23" and err["exception_message"].startswith("attn_mask: attention masks")
        # VIT-G has an SDXL file here (ip-adapter_sdxl) but no SD 1.x one: the loader says so for sd1
        err = await error_of(comfy, workflow(unified("VIT-G (medium strength)", "ref1.png")))
        assert (err["node_id"], err["node_type"]) == ("10", "IPAdapterUnifiedLoader")
        assert err["exception_message"].startswith("preset: 'VIT-G (medium strength)' has no SD 1.x file")
        # a fourth adapter on one MODEL (our units: at most 3 per request)
        chain = [
            advanced((f"{i}0", f"{i}1", f"{i}2", f"{i}3"), "ip-adapter_sd15", VIT_H, "ref1.png")
            for i in (2, 3, 4, 5)
        ]
        err = await error_of(comfy, workflow(*chain))
        assert err["node_id"] == "53" and err["exception_message"].startswith(
            "model: at most 3 IPAdapter nodes"
        )

    comfy_: Any = None
    run(ip_root, scenario, models=["sd1"])


def test_prep_image_for_clip_vision() -> None:
    """cubiq's PrepImageForClipVision: the square at crop_position (or padded), truncated to 8 bits,
    PIL-resized to 224; its sharpening is AMD's CAS, checked pixel by pixel against the formula
    (3x3 cross and corner min / max, zero padding) written out as loops."""
    from service.comfy.nodes_clip_prep import sharpen

    src = reference(3, (40, 56))  # 40 wide, 56 high
    image = torch.from_numpy(np.asarray(src, dtype=np.float32) / 255)[None]
    for crop, box in (("top", (0, 0, 40, 40)), ("bottom", (0, 16, 40, 56)), ("center", (0, 8, 40, 48))):
        want = np.asarray(src.crop(box).resize((224, 224), Image.Resampling.BICUBIC), dtype=np.float32) / 255
        got = prep_for_clip(image, "BICUBIC", crop, 0.0)[0].numpy()
        assert np.array_equal(got, want), crop
    padded = Image.new("RGB", (56, 56))
    padded.paste(src, (8, 0))
    want = np.asarray(padded.resize((224, 224), Image.Resampling.LANCZOS), dtype=np.float32) / 255
    assert np.array_equal(prep_for_clip(image, "LANCZOS", "pad", 0.0)[0].numpy(), want)

    x = torch.rand(1, 1, 5, 6, generator=torch.Generator().manual_seed(0))
    amount = 0.15
    p = np.pad(x[0, 0].numpy().astype(np.float64), 1)
    ref = np.zeros((5, 6))
    for i in range(5):
        for j in range(6):
            n = p[i : i + 3, j : j + 3]
            cross = [n[0, 1], n[1, 0], n[1, 1], n[1, 2], n[2, 1]]
            diag = [n[0, 0], n[0, 2], n[2, 0], n[2, 2]]
            lo, hi = min(cross) + min(diag), max(cross) + max(diag)
            amp = np.sqrt(min(lo, 2 - hi) / hi)
            w = -amp * (1 / 8 + amount * (1 / 5 - 1 / 8))
            ref[i, j] = np.clip((w * (n[0, 1] + n[1, 0] + n[1, 2] + n[2, 1]) + n[1, 1]) / (1 + 4 * w), 0, 1)
    assert np.allclose(sharpen(x, amount)[0, 0].numpy(), ref, atol=1e-6)
    assert not np.allclose(ref, x[0, 0].numpy(), atol=1e-3)  # it did sharpen

"""Open WebUI's and SillyTavern's ComfyUI workflows on our engine: validated, executed, and the
same image as the same request through the service (/sample's path)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image

from service.comfy import Comfy
from service.comfy.nodes_image import resize
from service.comfy.runtime import image_to_pil, pil_to_image
from service.comfy.testing import MemoryContext
from service.image_gate import GatedImage
from service.serving.request import GenerationRequest

from .conftest import pixels, run
from .workflows import OPEN_WEBUI_DEFAULT, SILLYTAVERN_AVATAR, SILLYTAVERN_DEFAULT, open_webui, sillytavern


def saved(ctx: MemoryContext, result_outputs: dict, node: str = "9") -> list[bytes]:
    return [ctx.files[(i["type"], i["subfolder"], i["filename"])] for i in result_outputs[node]["images"]]


def digits(label: int, steps: int, seed: int | list[int]) -> GenerationRequest:
    """The A1111 routes' request for Open WebUI's digits workflow (cfg 8, euler; 'normal' on this
    continuous-time model is its equivalent 'exponential' over the model's range)."""
    return GenerationRequest(
        model="digits",
        class_label=label,
        cfg_scale=8.0,
        sampler="euler",
        schedule="exponential",
        steps=steps,
        seed=seed,
    )


async def same_as_service(comfy: Comfy, request: GenerationRequest) -> list[np.ndarray]:
    job = await comfy.service.generate(request)
    await job.wait_done()
    return [pixels(p) for p in job.result.pngs]


def test_open_webui_default_workflow_on_digits_is_the_sample_image(store: Path) -> None:
    """A digit in the positive prompt picks the class; 'normal' on the continuous-time digits model
    runs as its equivalent (exponential over the model's range), as on the A1111 routes."""

    async def scenario(comfy: Comfy) -> None:
        wf = open_webui("digits", "a handwritten 7", 512, 512, 1, 6, 1234)
        v = comfy.validate(wf)
        assert v.ok and v.node_errors == {} and v.outputs == ["9"]
        ctx = MemoryContext(owner="k1")
        r = await comfy.run(wf, "p1", ctx)
        assert r.status_str == "success" and r.completed, r.error
        assert list(r.outputs) == ["9"] and len(r.outputs["9"]["images"]) == 1
        got = pixels(saved(ctx, r.outputs)[0])
        want = await same_as_service(
            comfy,
            digits(7, 6, 1234),
        )
        assert got.shape == (16, 16, 3) and np.array_equal(got, want[0])
        other = await same_as_service(
            comfy,
            digits(3, 6, 1234),
        )
        assert not np.array_equal(got, other[0])  # the class did come from the prompt
        kinds = ctx.kinds()
        assert (
            kinds[0] == "execution_start"
            and kinds[1] == "execution_cached"
            and kinds[-1] == "execution_success"
        )
        assert "progress" in kinds and ("executed", "9") in [(k, d.get("node")) for k, d in ctx.events]
        assert all(d["prompt_id"] == "p1" for _, d in ctx.events)

    run(store, scenario)


def test_sillytavern_default_workflow_on_tiny_sd_is_the_sample_image(store: Path) -> None:
    async def scenario(comfy: Comfy) -> None:
        seed = 2**53 - 1  # SillyTavern draws seeds up to Number.MAX_SAFE_INTEGER
        wf = sillytavern(
            SILLYTAVERN_DEFAULT,
            scale=6.5,
            sampler="dpmpp_2m",
            scheduler="karras",
            seed=seed,
            steps=4,
            model="sd1.safetensors",
            width=64,
            height=64,
            prompt="a red cat",
            negative_prompt="the dog",
        )
        ctx = MemoryContext()
        r = await comfy.run(wf, "st", ctx)
        assert r.status_str == "success", r.error
        got = pixels(saved(ctx, r.outputs)[0])
        want = await same_as_service(
            comfy,
            GenerationRequest(
                model="sd1",
                prompt="a red cat",
                negative_prompt="the dog",
                cfg_scale=6.5,
                sampler="dpmpp_2m",
                schedule="karras",
                steps=4,
                seed=seed,
                width=64,
                height=64,
            ),
        )
        assert got.shape == (64, 64, 3) and np.array_equal(got, want[0])

    run(store, scenario)


def test_a_batch_is_one_seed_per_image_and_comfy_seeds_reach_2_64(store: Path) -> None:
    """batch_size 3 with seed s: image i is /sample's image with seed s + i (alone); ComfyUI's top
    seed 2**64 - 1 is taken (mod 2**63)."""

    async def scenario(comfy: Comfy) -> None:
        for seed in (77, 2**64 - 1):
            wf = open_webui("digits", "four", 64, 64, 3, 4, seed)
            ctx = MemoryContext()
            r = await comfy.run(wf, f"b{seed}", ctx)
            assert r.status_str == "success", r.error
            got = [pixels(p) for p in saved(ctx, r.outputs)]
            assert len(got) == 3
            for i in range(3):
                alone = await same_as_service(
                    comfy,
                    digits(4, 4, [(seed + i) % 2**63]),
                )
                assert np.array_equal(got[i], alone[0])

    run(store, scenario)


def _avatar_png() -> str:
    img = Image.new("RGB", (40, 30))
    img.putdata([((x * 7) % 256, (y * 9) % 256, 128) for y in range(30) for x in range(40)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_sillytavern_avatar_workflow_img2img_through_the_gate(store: Path) -> None:
    """ETN_LoadImageBase64 -> ImageScale -> VAEEncode -> KSampler(denoise) on tiny SD: the same image
    as /sample's img2img with the scaled avatar as its init image."""

    async def scenario(comfy: Comfy) -> None:
        avatar = _avatar_png()
        settings = {
            "seed": 5,
            "steps": 4,
            "scale": 5.0,
            "sampler": "euler",
            "scheduler": "normal",
            "denoise": 0.6,
        }
        card = {"model": "sd1", "prompt": "the cat", "negative_prompt": "", "width": 64, "height": 48}
        wf = sillytavern(SILLYTAVERN_AVATAR, **settings, **card, char_avatar=avatar)
        assert comfy.validate(wf).ok
        ctx = MemoryContext()
        r = await comfy.run(wf, "av", ctx)
        assert r.status_str == "success", r.error
        got = pixels(saved(ctx, r.outputs)[0])
        assert got.shape == (48, 64, 3)
        # the init image /sample would get: the avatar cropped to 64:48 at the centre, bicubic to 64x48
        src = Image.open(io.BytesIO(base64.b64decode(avatar)))
        init = image_to_pil(resize(pil_to_image(src), 64, 48, "bicubic", "center")[0])
        fields = {"prompt": "the cat", "cfg_scale": 5.0, "sampler": "euler", "schedule": "normal", "steps": 4}
        img2img = {"init_image": GatedImage(init, "init_image"), "denoise": 0.6, "width": 64, "height": 48}
        want = await same_as_service(comfy, GenerationRequest(model="sd1", seed=[5], **fields, **img2img))
        assert np.array_equal(got, want[0])

    run(store, scenario)


def test_the_frontends_workflows_parse_as_shipped() -> None:
    import json

    for text in (OPEN_WEBUI_DEFAULT, SILLYTAVERN_DEFAULT, SILLYTAVERN_AVATAR):
        assert all("class_type" in n for n in json.loads(text).values())


def test_batch_num_in_the_prefix_is_each_images_index(store: Path) -> None:
    """ComfyUI's SaveImage: ``%batch_num%`` in the file name part of the prefix is the image's index
    in the batch (a subfolder's is left as it is)."""

    async def scenario(comfy: Comfy) -> None:
        wf = open_webui("digits", "a 4", 16, 16, 2, 2, 5)
        wf["9"]["inputs"]["filename_prefix"] = "%batch_num%/img_%batch_num%"
        ctx = MemoryContext(owner="k1")
        r = await comfy.run(wf, "p1", ctx)
        assert r.status_str == "success", r.error
        names = [(i["subfolder"], i["filename"]) for i in r.outputs["9"]["images"]]
        assert names == [("%batch_num%", "img_0_00001_.png"), ("%batch_num%", "img_1_00002_.png")]

    run(store, scenario)

"""IP-Adapter over HTTP on tiny random files in h94's published layouts: /sample against diffusers'
StableDiffusionPipeline / StableDiffusionXLPipeline with ``load_ip_adapter`` + ``set_ip_adapter_scale``
on the same files (plain .safetensors, plus .bin, SDXL plain, SDXL plus on the ViT-H encoder), same seed
noise and sigmas: within 2/255; an A1111 ControlNet unit with module ``ip-adapter_*`` is the same request;
the 422s (unknown adapter listing those available, another base model, an image bomb)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")

from diffusers import EulerDiscreteScheduler  # noqa: E402

from service.models.store import ModelStore  # noqa: E402
from service.sampling.noise import NoiseSource  # noqa: E402
from tests.models.test_controlnet_diffusers import png_image  # noqa: E402
from tests.models.test_controlnet_http import _pixels, _post, _rows  # noqa: E402
from tests.models.test_ipadapter import png  # noqa: E402
from tests.support.app_client import app_client
from tests.support.ipadapter_tiny import ip_store  # noqa: E402
from tests.support.sd_tiny import diffusers_pipeline  # noqa: E402

STEPS, CFG, SEED = 4, 5.0, 11
LAYOUTS = [
    ("sd1", "ip-adapter_sd15"),
    ("sdxl", "ip-adapter-plus_sdxl_vit-h"),
    ("sd1", "ip-adapter-plus_sd15"),
    ("sdxl", "ip-adapter_sdxl"),
]
ENCODER = {"ip-adapter_sdxl": "sdxl_models/image_encoder"}  # the others use the top image_encoder


@pytest.fixture(scope="module")
def root() -> tuple[Path, dict[str, Path]]:
    return ip_store()


@pytest.fixture(scope="module")
def client(root: tuple[Path, dict[str, Path]]) -> Iterator[TestClient]:
    with app_client(root[0], batch_wait_ms=100) as c:
        yield c


def _reference(
    store: Path, model: str, adapter: Path, image: str, weight: float, output: str = "np"
) -> np.ndarray:
    """diffusers' pipeline with load_ip_adapter on the same file (its own copy of the model)."""
    from transformers import CLIPVisionModelWithProjection

    sd = ModelStore(store).load(model).text_model  # type: ignore[attr-defined]
    scheduler = EulerDiscreteScheduler.from_config(sd.components.scheduler_config)
    pipe = diffusers_pipeline(sd, scheduler)
    encoder = store / "ipadapter" / ENCODER.get(adapter.stem, "image_encoder")
    pipe.register_modules(image_encoder=CLIPVisionModelWithProjection.from_pretrained(str(encoder)))
    pipe.load_ip_adapter(
        str(adapter.parent), subfolder="", weight_name=adapter.name, image_encoder_folder=None
    )
    pipe.set_ip_adapter_scale(weight)
    noise = NoiseSource([SEED]).randn((4, 8, 8), "cpu", torch.float32)
    size = {
        "height": 64,
        "width": 64,
        "num_inference_steps": STEPS,
        "guidance_scale": CFG,
        "output_type": output,
    }
    with torch.inference_mode():
        out = pipe(
            "a red cat", negative_prompt="the dog", ip_adapter_image=png_image(image), latents=noise, **size
        ).images[0]
    if output == "latent":
        return out.numpy()  # type: ignore[no-any-return]
    return np.round(out * 255).astype(np.int16)  # type: ignore[no-any-return]


def test_an_adapter_counts_in_its_models_memory(
    client: TestClient, root: tuple[Path, dict[str, Path]]
) -> None:
    """The adapters and encoders a request loads join its model's footprint (GET /models
    ``memory_bytes``, what KDIFF_MEMORY_BUDGET evicts and refuses by, as for ControlNets). First in
    the module: no request of this server has loaded ip-adapter_sdxl yet."""
    from service.models.ipadapter import ImageAdapters

    def sdxl_bytes() -> int:
        return next(m["memory_bytes"] for m in client.get("/models").json()["models"] if m["name"] == "sdxl")

    body = {"model": "sdxl", "prompt": "x", "steps": 1, "width": 64, "height": 64}
    _post(client, **body)  # loaded, no adapter yet
    before = sdxl_bytes()
    _post(client, **body, ip_adapters=[{"model": "ip-adapter_sdxl", "image": png(1)}])
    sd = ModelStore(root[0]).load("sdxl").text_model  # type: ignore[attr-defined]
    ours = ImageAdapters(root[0], sd.unet, sd.device, sd.dtype, "sdxl")
    ours.resolve("ip-adapter_sdxl", "x")
    assert sdxl_bytes() - before == ours.held_bytes() > 0


@pytest.mark.parametrize(
    ("model", "adapter"),
    [
        *LAYOUTS[:2],
        # the other two layouts (plus .bin on SD1, plain on SDXL's own encoder): -m slow
        *(pytest.param(*case, marks=pytest.mark.slow) for case in LAYOUTS[2:]),
    ],
)
def test_sample_matches_diffusers_ip_adapter_pipeline(
    client: TestClient, root: tuple[Path, dict[str, Path]], model: str, adapter: str
) -> None:
    store, files = root
    image = png(8)
    want = _reference(store, model, files[adapter], image, 0.7)
    sched = EulerDiscreteScheduler.from_pretrained(str(store / model / "scheduler"))
    sched.set_timesteps(STEPS)
    body = {
        "model": model,
        "prompt": "a red cat",
        "negative_prompt": "the dog",
        "sampler": "euler",
        "sigmas": [float(s) for s in sched.sigmas],
        "seed": SEED,
        "cfg_scale": CFG,
        "width": 64,
        "height": 64,
    }
    out = _post(client, **body, ip_adapters=[{"model": adapter, "image": image, "weight": 0.7}])
    plain = _post(client, **body)
    got = _pixels(out["images"][0])
    assert np.abs(got - want).max() <= 2
    assert np.abs(_pixels(plain["images"][0]) - want).max() > 2  # the adapter changed the image


def test_concurrent_requests_with_different_adapters_share_calls(client: TestClient) -> None:
    """none / plain A / plus B at another weight / A + a ControlNet, sent together: their rows share
    UNet calls (/metrics) and each image equals its solo run."""
    plain = {"model": "ip-adapter_sd15", "image": png(5)}
    bodies: list[dict[str, Any]] = [
        {},
        {"ip_adapters": [plain]},
        {"ip_adapters": [{"model": "ip-adapter-plus_sd15", "image": png(6), "weight": 0.5}]},
        {"ip_adapters": [plain], "controlnets": [{"model": "cn_a", "image": png(7, (64, 64))}]},
    ]
    for b in bodies:
        b.update(model="sd1", prompt="a red cat", steps=STEPS, seed=3, sampler="euler", width=64, height=64)
    solo = {i: _post(client, **b)["images"][0] for i, b in enumerate(bodies)}
    before = _rows(client.get("/metrics").text)
    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = {i: pool.submit(_post, client, **b) for i, b in enumerate(bodies)}
        together = {i: f.result()["images"][0] for i, f in futures.items()}
    rows, calls = np.subtract(_rows(client.get("/metrics").text), before)
    assert rows == 8 * STEPS and calls < 4 * STEPS, f"{rows} rows in {calls} calls: no sharing"
    assert max(np.abs(_pixels(solo[i]) - _pixels(together[i])).max() for i in solo) <= 1
    assert np.abs(_pixels(solo[0]) - _pixels(solo[1])).max() > 2  # adapter A acts


def test_a1111_ip_adapter_unit_is_our_request(client: TestClient) -> None:
    image = png(4)
    common = {"prompt": "a red cat", "steps": STEPS, "seed": 5, "cfg_scale": CFG, "width": 64, "height": 64}
    # the units as webuiapi's ControlNetUnit sends them (its to_dict, every field), one disabled
    webuiapi = pytest.importorskip("webuiapi")
    unit = webuiapi.ControlNetUnit(
        image=png_image(image),
        module="ip-adapter_clip_sd15",
        model="ip-adapter-plus_sd15 [c817b455]",
        weight=0.8,
        guidance_end=0.5,
    ).to_dict()
    off = webuiapi.ControlNetUnit(
        module="ip-adapter_clip_sd15", model="ip-adapter_sd15", enabled=False
    ).to_dict()
    a1111 = _post(
        client,
        "/sdapi/v1/txt2img",
        **common,
        sampler_name="Euler",
        override_settings={"sd_model_checkpoint": "sd1"},
        alwayson_scripts={"ControlNet": {"args": [unit, off]}},
    )
    ours = _post(
        client,
        **common,
        model="sd1",
        sampler="euler",
        ip_adapters=[{"model": "ip-adapter-plus_sd15", "image": image, "weight": 0.8, "guidance_end": 0.5}],
    )
    plain = _post(client, **common, model="sd1", sampler="euler")
    assert np.abs(_pixels(a1111["images"][0]) - _pixels(ours["images"][0])).max() <= 1
    assert np.abs(_pixels(plain["images"][0]) - _pixels(ours["images"][0])).max() > 2


@pytest.mark.parametrize(
    ("ref", "field", "listed"),
    [
        ({"model": "nope"}, "model", "ip-adapter_sd15"),
        ({"model": "ip-adapter_sdxl"}, "model", "cross_attention_dim 80"),  # the tiny SDXL's width
    ],
)
def test_bad_adapters_are_422_naming_the_field(
    client: TestClient, ref: dict[str, Any], field: str, listed: str
) -> None:
    """Our field and A1111's unit (module ip-adapter_*) alike: 422 naming the field and what is allowed."""
    unit = {"module": "ip-adapter_clip_h", "image": png(1), **ref}
    a1111 = {"width": 64, "height": 64, "override_settings": {"sd_model_checkpoint": "sd1"}}
    bodies = {
        "/sample": {"model": "sd1", "ip_adapters": [{"image": png(1), **ref}]},
        "/sdapi/v1/txt2img": a1111 | {"alwayson_scripts": {"controlnet": {"args": [unit]}}},
    }
    for path, body in bodies.items():
        r = client.post(path, json={"prompt": "x", "steps": 2, **body})
        assert r.status_code == 422 and listed in r.text, (path, r.text)
        assert field in r.text


def test_a1111_routes_list_the_adapters(client: TestClient, root: tuple[Path, dict[str, Path]]) -> None:
    models = client.get("/controlnet/model_list").json()["model_list"]
    assert models == sorted(["cn_a", *root[1]])
    ip = client.get("/controlnet/control_types").json()["control_types"]["IP-Adapter"]
    assert ip["model_list"] == ["None", *sorted(root[1])] and "ip-adapter_clip_sd15" in ip["module_list"]


def test_hires_fix_and_img2img_keep_the_adapter(client: TestClient) -> None:
    """A1111's hires fix (the second pass builds its rows at the hires size with the same image) and
    img2img (a unit without an image takes the init image, as the extension does)."""
    base = {"prompt": "a red cat", "steps": 2, "seed": 5, "width": 64, "height": 64, "cfg_scale": CFG}
    base |= {"override_settings": {"sd_model_checkpoint": "sd1"}}
    hires = base | {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "denoising_strength": 0.6}
    unit = {"module": "ip-adapter_clip_sd15", "model": "ip-adapter_sd15", "image": png(3)}
    with_unit = _post(client, "/sdapi/v1/txt2img", **hires, alwayson_scripts={"controlnet": {"args": [unit]}})
    bare = _post(client, "/sdapi/v1/txt2img", **hires)
    assert _pixels(with_unit["images"][0]).shape == (96, 96, 3)
    assert np.abs(_pixels(with_unit["images"][0]) - _pixels(bare["images"][0])).max() > 2
    i2i = base | {"init_images": [png(9, (64, 64))], "denoising_strength": 0.8}
    own = _post(
        client, "/sdapi/v1/img2img", **i2i, alwayson_scripts={"controlnet": {"args": [unit | {"image": ""}]}}
    )
    same = {"model": "ip-adapter_sd15", "image": i2i["init_images"][0]}
    ours = _post(client, "/sdapi/v1/img2img", **i2i, alwayson_scripts={"controlnet": {"args": [unit | same]}})
    assert np.abs(_pixels(own["images"][0]) - _pixels(ours["images"][0])).max() <= 1


def test_image_bomb_is_refused(client: TestClient) -> None:
    from tests.support.hostile_images import bomb_png

    bomb = base64.b64encode(bomb_png(12000, 12000)).decode()
    r = client.post(
        "/sample",
        json={
            "model": "sd1",
            "prompt": "x",
            "steps": 2,
            "ip_adapters": [{"model": "ip-adapter_sd15", "image": bomb}],
        },
    )
    assert r.status_code in (413, 422) and "image" in r.text


@pytest.mark.slow
@pytest.mark.parametrize(("model", "adapter"), LAYOUTS)
def test_latents_match_diffusers(root: tuple[Path, dict[str, Path]], model: str, adapter: str) -> None:
    """The final latents themselves (before the tiny VAE flattens differences): within 1e-4 of
    diffusers', while the adapter moves them by far more."""
    from service.models.text_generate import generate
    from service.serving.request import GenerationRequest, IPAdapterRef

    store, files = root
    want = torch.from_numpy(_reference(store, model, files[adapter], png(8), 0.7, output="latent"))
    sd = ModelStore(store).load(model).text_model  # type: ignore[attr-defined]
    sched = EulerDiscreteScheduler.from_pretrained(str(store / model / "scheduler"))
    sched.set_timesteps(STEPS)
    noise = NoiseSource([SEED]).randn((4, 8, 8), "cpu", torch.float32)
    run = {"seeds": [SEED], "sampler": "euler", "steps": STEPS, "cfg_scale": CFG, "width": 64, "height": 64}
    run |= {"sigmas": sched.sigmas, "x_start": noise * sched.sigmas[0], "output": "latents"}
    fields = GenerationRequest(ip_adapters=[IPAdapterRef(adapter, png(8), 0.7)])
    ours = generate(sd, "a red cat", "the dog", fields=fields, **run)
    plain = generate(sd, "a red cat", "the dog", **run)
    err = float((ours - want).abs().max())
    assert err <= 1e-4 and float((plain - want).abs().max()) > 1000 * err, err

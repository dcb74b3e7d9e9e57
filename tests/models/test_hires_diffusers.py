"""Hires fix over HTTP against diffusers: a live `kdiff serve` (tests/support/server.py) runs txt2img
with ``hires`` on the tiny SD1 and SDXL models; diffusers runs the same job as A1111 does it, by
hand: its txt2img pipeline (first pass, latents out), ``F.interpolate`` of those latents (A1111's
latent upscale modes) or the 8-bit Lanczos resize between VAE decode and encode, then its img2img
pipeline from the upscaled latents with the service's start noise for the same seed at the hires
size and the tail of a karras schedule of ``int(steps / denoise)`` steps (A1111's img2img with a
given step count). Each image must match within 2/255 per pixel."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")

from diffusers import (  # noqa: E402
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image  # noqa: E402

from service.sampling.noise import make_noise  # noqa: E402
from tests.support.sd_tiny import link_tiny_models  # noqa: E402
from tests.support.server import Server  # noqa: E402
from tests.support.upscaler_files import compact, spandrel_model, write  # noqa: E402

STEPS, HR_STEPS, DENOISE, CFG, SEED = 4, 3, 0.5, 5.0, 11
PROMPT, NEGATIVE = "a red cat", "the dog"
SIZE = 64  # the tiny models' native size; hires at 2x


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, Any]]]:
    root = tmp_path_factory.mktemp("hires-store")
    models = link_tiny_models(root)
    # an upscaler model in realesr-general-x4v3's layout (SRVGGNetCompact), smaller, random weights
    models["upscaler"] = write(root / "upscalers" / "compact-x4.pth", compact(8, 16, 4, seed=3), "params")
    (root / "upscalers" / "broken.pth").write_bytes(b"not a checkpoint" * 64)
    server = Server(root, root.parent / "server.log")
    try:
        server.wait_ready(240)  # a loaded 2-core machine: two models load first
        yield server.url, models
    finally:
        server.stop()


def _scheduler(model: Any, **config: Any) -> Any:
    return EulerDiscreteScheduler.from_config(model.text_model.components.scheduler_config, **config)


def _first_sigmas(model: Any) -> list[float]:
    scheduler = _scheduler(model)
    scheduler.set_timesteps(STEPS)
    return [float(s) for s in scheduler.sigmas]


def _hires_sigmas(model: Any) -> list[float]:
    """diffusers' karras sigmas over the model's whole sigma range (linspace spacing reaches both
    ends of the table) for int(steps / denoise) steps; the last HR_STEPS of them, then 0."""
    scheduler = _scheduler(model, use_karras_sigmas=True, timestep_spacing="linspace")
    total = int(HR_STEPS / DENOISE)
    scheduler.set_timesteps(total)
    return [float(s) for s in scheduler.sigmas[total - HR_STEPS :]]


def _pipelines(model: Any) -> tuple[Any, Any]:
    c = model.text_model.components
    kw: dict[str, Any] = {"vae": c.vae, "text_encoder": c.text_encoders[0], "tokenizer": c.tokenizers[0],
                          "unet": c.unet, "scheduler": _scheduler(model)}  # fmt: skip
    if model.text_model.is_sdxl:
        kw |= {"text_encoder_2": c.text_encoders[1], "tokenizer_2": c.tokenizers[1]}
        return StableDiffusionXLPipeline(**kw), StableDiffusionXLImg2ImgPipeline(
            requires_aesthetics_score=False, **kw
        )
    extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    return StableDiffusionPipeline(**kw, **extra), StableDiffusionImg2ImgPipeline(**kw, **extra)


def _resize_lanczos(model: Any, latents: torch.Tensor, size: int, net: Any = None) -> torch.Tensor:
    """A1111's pixel path: decode, 8-bit image, the upscaler model ``net`` (spandrel's inference; its
    output back to 8 bits, as A1111's PIL images are), Lanczos resize, encode (the posterior mean)."""
    vae = model.text_model.components.vae
    with torch.inference_mode():
        image = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
        eight = ((image + 1) / 2 * 255).to(torch.uint8)
        if net is not None:
            eight = (net(eight.float() / 255).clamp(0, 1) * 255).round().to(torch.uint8)
        pixels = eight[0].permute(1, 2, 0).numpy()
        big = Image.fromarray(pixels).resize((size, size), Image.Resampling.LANCZOS)
        t = torch.from_numpy(np.asarray(big, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        return vae.encode(t).latent_dist.mean * vae.config.scaling_factor


def _diffusers(model: Any, mode: str | None, antialias: bool, net: Any = None) -> np.ndarray:
    txt2img, img2img = _pipelines(model)
    for pipe in (txt2img, img2img):
        pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        first = txt2img(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG,
                        height=SIZE, width=SIZE, latents=make_noise((1, 4, 8, 8), [SEED]),
                        output_type="latent").images  # fmt: skip
    if mode is not None:
        up = F.interpolate(first, size=(16, 16), mode=mode, antialias=antialias)
    else:
        up = _resize_lanczos(model, first, 2 * SIZE, net)
    assert torch.equal(
        make_noise((1, 4, 16, 16), [SEED]),
        torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(SEED)),
    )
    with torch.inference_mode():
        # strength 1 over the given tail: every sigma of it runs, the noise added at its first
        out = img2img(PROMPT, negative_prompt=NEGATIVE, image=up, strength=1.0, sigmas=_hires_sigmas(model),
                      guidance_scale=CFG, generator=torch.Generator().manual_seed(SEED),
                      output_type="np").images[0]  # fmt: skip
    return np.asarray(np.round(np.clip(out, 0, 1) * 255), dtype=np.int16)


def _ours(url: str, name: str, model: Any, upscaler: str) -> tuple[np.ndarray, dict[str, Any]]:
    body = {"model": name, "prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": SEED, "sampler": "euler",
            "sigmas": _first_sigmas(model), "cfg_scale": CFG, "width": SIZE, "height": SIZE,
            "hires": {"scale": 2, "upscaler": upscaler, "steps": HR_STEPS, "denoise": DENOISE,
                      "schedule": "karras"}}  # fmt: skip
    r = httpx.post(f"{url}/sample", json=body, timeout=300)
    assert r.status_code == 200, r.text
    img = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
    return np.asarray(img, dtype=np.int16), r.json()["parameters"]


CASES = [
    ("sd1", "Latent", "bilinear", False),
    ("sd1", "Latent (bicubic antialiased)", "bicubic", True),
    ("sd1", "Latent (nearest-exact)", "nearest-exact", False),
    ("sd1", "Lanczos", None, False),
    ("sdxl", "Latent", "bilinear", False),
    ("sdxl", "Latent (antialiased)", "bilinear", True),
]


@pytest.mark.parametrize(("name", "upscaler", "mode", "antialias"), CASES)
def test_hires_fix_matches_diffusers_two_pipelines_over_http(
    served: tuple[str, dict[str, Any]], name: str, upscaler: str, mode: str | None, antialias: bool
) -> None:
    url, models = served
    model = models[name]
    ours, params = _ours(url, name, model, upscaler)
    assert ours.shape == (2 * SIZE, 2 * SIZE, 3)
    hires = params["hires"]
    assert (hires["width"], hires["height"], hires["steps"], hires["upscaler"]) == (
        128,
        128,
        HR_STEPS,
        upscaler,
    )
    want = _diffusers(model, mode, antialias)
    err = int(np.abs(ours - want).max())
    print(f"{name} {upscaler}: max |ours - diffusers| {err}/255")
    assert err <= 2, f"max |ours - diffusers| = {err}/255 ({name}, {upscaler})"


def test_hires_fix_with_an_upscaler_model_matches_diffusers_and_spandrel(
    served: tuple[str, dict[str, Any]],
) -> None:
    """A pixel upscaler model between the passes: ours (service/models/upscalers) against spandrel's
    inference on the same file, in diffusers' two-pipeline hires fix."""
    url, models = served
    net, scale, _ = spandrel_model(models["upscaler"])
    assert scale == 4
    ours, params = _ours(url, "sd1", models["sd1"], "compact-x4")
    assert params["hires"]["upscaler"] == "compact-x4" and ours.shape == (2 * SIZE, 2 * SIZE, 3)
    want = _diffusers(models["sd1"], None, False, net)
    plain = _diffusers(models["sd1"], None, False)  # Lanczos only: the model must show
    err, effect = int(np.abs(ours - want).max()), int(np.abs(want - plain).max())
    print(f"sd1 compact-x4: max |ours - diffusers + spandrel| {err}/255; the model's effect {effect}/255")
    assert effect > 10 and err <= 2, (err, effect)


def test_a_corrupt_upscaler_file_fails_only_its_requests(served: tuple[str, dict[str, Any]]) -> None:
    url = served[0]
    hires = {"scale": 2, "steps": 1, "denoise": 0.5}
    body = {"model": "sd1", "prompt": PROMPT, "steps": 1, "width": SIZE, "height": SIZE}
    r = httpx.post(f"{url}/sample", json={**body, "hires": {**hires, "upscaler": "broken"}}, timeout=120)
    assert r.status_code == 422 and "broken" in r.text, r.text
    for upscaler in ("compact-x4", "Latent"):
        r = httpx.post(f"{url}/sample", json={**body, "hires": {**hires, "upscaler": upscaler}}, timeout=120)
        assert r.status_code == 200, r.text

"""Real LoRA files over HTTP: a live `kdiff serve` (tests/support/server.py) generates with kohya, PEFT
and diffusers-layout files (key names as the tools write them, tests/support/lora_files.py) named by
``<lora:name:weight>`` tags, and each image equals diffusers' StableDiffusion(XL)Pipeline with
``load_lora_weights`` on the same file, same start noise and sigmas, within 2/255 per pixel. Files we
do not support (LoHa, DoRA) and tag weights that are not finite are refused naming the key / tag on
our API, the A1111 and the OpenAI routes."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")
pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft (dev extra)")

from PIL import Image  # noqa: E402

from service.sampling.noise import make_noise  # noqa: E402
from tests.support.lora_files import euler_sigmas, kohya_file, real_file, reference_pipeline, save  # noqa: E402
from tests.support.sd_tiny import link_tiny_models  # noqa: E402
from tests.support.server import running  # noqa: E402

STEPS, CFG, SEED, WEIGHT = 4, 5.0, 11, 0.9
# The tiny random models barely react to LoRAs of a trained file's size; these change the images by
# 10-36/255. kohya files scale by alpha / rank = 2 / 4, the others by 1: the same effective size.
STD = {"kohya": 3.0, "peft": 1.5, "diffusers": 1.5}
PROMPT, NEGATIVE = "a red cat", "the dog"
# name -> (model, layout); kohya on SD1 is a LoCon (resnet / down- / upsampler convs too), on SDXL it
# has the SGM UNet names and lora_te1_ / lora_te2_.
FILES = {
    "k1": ("sd1", "kohya"),
    "p1": ("sd1", "peft"),
    "d1": ("sd1", "diffusers"),
    "kxl": ("sdxl", "kohya"),
}
LOHA = "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a"
DORA = "lora_te_text_model_encoder_layers_0_mlp_fc1.dora_scale"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, dict[str, Any]]]:
    root = tmp_path_factory.mktemp("lora-store")
    models = link_tiny_models(root)
    for i, (lora, (model, layout)) in enumerate(FILES.items()):
        save(real_file(models[model], layout, 20 + i, STD[layout]), root / "loras" / f"{lora}.safetensors")
    save({LOHA: torch.zeros(2, 2)}, root / "loras" / "loha.safetensors")
    dora = kohya_file(models["sd1"].text_model.unet, models["sd1"].text_model.components.text_encoders, 0)
    dora[DORA] = torch.ones(64)
    save(dora, root / "loras" / "dora.safetensors")
    with running(root, root.parent / "server.log") as server:
        yield server.url, root, models


def _ours(url: str, model: str, prompt: str, sigmas: list[float]) -> np.ndarray:
    body = {"model": model, "prompt": prompt, "negative_prompt": NEGATIVE, "seed": SEED, "sampler": "euler",
            "sigmas": sigmas, "cfg_scale": CFG, "width": 64, "height": 64}  # fmt: skip
    r = httpx.post(f"{url}/sample", json=body, timeout=120)
    assert r.status_code == 200, r.text
    img = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
    return np.asarray(img, dtype=np.int16)


def _diffusers(model: Any, lora: Path | None) -> np.ndarray:
    """diffusers' pipeline with the LoRA loaded by load_lora_weights, from the service's start noise."""
    pipe = reference_pipeline(model, lora, WEIGHT)
    noise = make_noise((1, 4, 8, 8), [SEED])  # the service's start noise for this seed
    with torch.inference_mode():
        out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG,
                   height=64, width=64, latents=noise, output_type="np").images[0]  # fmt: skip
    return np.asarray(np.round(np.clip(out, 0, 1) * 255), dtype=np.int16)


@pytest.mark.parametrize("lora", list(FILES))
def test_real_lora_files_match_diffusers_over_http(
    served: tuple[str, Path, dict[str, Any]], lora: str
) -> None:
    url, root, models = served
    name = FILES[lora][0]
    model = models[name]
    sigmas = euler_sigmas(model, STEPS)
    ours = _ours(url, name, f"{PROMPT} <lora:{lora}:{WEIGHT}>", sigmas)
    want = _diffusers(model, root / "loras" / f"{lora}.safetensors")
    plain = _ours(url, name, PROMPT, sigmas)
    assert np.abs(plain - _diffusers(model, None)).max() <= 2  # the comparison itself holds without LoRA
    effect, err = int(np.abs(want - plain).max()), int(np.abs(ours - want).max())
    print(f"{lora} ({FILES[lora][1]} on {name}): max |ours - diffusers| {err}/255, LoRA effect {effect}/255")
    assert effect > 10, "the LoRA must change the image for the test to mean anything"
    assert err <= 2, f"max |ours - diffusers| = {err}/255 for {lora} ({FILES[lora][1]})"


def test_unsupported_files_are_refused_naming_the_key(served: tuple[str, Path, dict[str, Any]]) -> None:
    url = served[0]
    for lora, key, what in (("loha", LOHA, "LoHa"), ("dora", DORA, "DoRA")):
        r = httpx.post(f"{url}/sample", json={"model": "sd1", "prompt": "x", "steps": 1,
                                              "loras": [{"name": lora}]}, timeout=60)  # fmt: skip
        assert r.status_code == 422, r.text
        detail = r.json()["detail"][0]
        assert detail["loc"] == ["body", "loras"] and key in detail["msg"] and what in detail["msg"]


@pytest.mark.parametrize("weight", ["nan", "inf", "1e400"])
def test_non_finite_tag_weights_are_refused_on_every_route(
    served: tuple[str, Path, dict[str, Any]], weight: str
) -> None:
    url = served[0]
    tag = f"<lora:k1:{weight}>"
    prompt = f"a cat {tag}"
    ours = httpx.post(f"{url}/sample", json={"model": "sd1", "prompt": prompt, "steps": 1}, timeout=60)
    assert ours.status_code == 422, ours.text
    detail = ours.json()["detail"][0]
    assert detail["loc"] == ["body", "prompt"] and tag in detail["msg"]
    settings = {"sd_model_checkpoint": "sd1"}
    a1111_body = {"prompt": prompt, "steps": 1, "width": 64, "height": 64, "override_settings": settings}
    a1111 = httpx.post(f"{url}/sdapi/v1/txt2img", json=a1111_body, timeout=60)
    assert a1111.status_code == 422, a1111.text
    assert tag in str(a1111.json()["detail"])
    oai_body = {"model": "sd1", "prompt": prompt, "size": "64x64"}
    oai = httpx.post(f"{url}/v1/images/generations", json=oai_body, timeout=60)
    assert oai.status_code == 400, oai.text  # OpenAI's invalid_request_error
    err = oai.json()["error"]
    assert err["param"] == "prompt" and tag in err["message"]


def test_hires_prompt_tags_are_the_second_pass_loras(served: tuple[str, Path, dict[str, Any]]) -> None:
    """A1111's rule (processing.py sample_hr_pass activates the hires prompt's extra networks): an
    ``hr_prompt`` that repeats the first prompt's ``<lora:...>`` tag gives the image of no hr_prompt
    (the tag applied again, and not left in the text); one without the tag drops the LoRA in the
    second pass only; a tag only in hr_prompt applies it in the second pass only."""
    url = served[0]
    tagged = f"{PROMPT} <lora:k1:{WEIGHT}>"

    def hires(prompt: str, hr_prompt: str) -> np.ndarray:
        body = {"prompt": prompt, "negative_prompt": NEGATIVE, "seed": SEED, "steps": 3, "cfg_scale": CFG,
                "sampler_name": "Euler", "width": 64, "height": 64, "enable_hr": True, "hr_scale": 2,
                "hr_second_pass_steps": 2, "denoising_strength": 0.6, "hr_prompt": hr_prompt,
                "override_settings": {"sd_model_checkpoint": "sd1"}}  # fmt: skip
        r = httpx.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=120)
        assert r.status_code == 200, r.text
        img = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
        assert img.size == (128, 128)
        return np.asarray(img, dtype=np.int16)

    both = hires(tagged, "")
    assert np.array_equal(hires(tagged, tagged), both)
    first_only, second_only, neither = hires(tagged, PROMPT), hires(PROMPT, tagged), hires(PROMPT, "")
    for name, img in [("first pass only", first_only), ("second pass only", second_only)]:
        assert np.abs(img - both).max() > 3 and np.abs(img - neither).max() > 3, name
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64,
                   "enable_hr": True, "hr_prompt": "x <lora:nope:1>",
                   "override_settings": {"sd_model_checkpoint": "sd1"}}, timeout=60)  # fmt: skip
    assert r.status_code == 422 and "nope" in r.text and "hires prompt" in r.text, r.text

"""Textual-inversion embeddings over HTTP: a live `kdiff serve` (tests/support/server.py) with A1111's
own .pt layout, kohya's emb_params safetensors and an SDXL clip_l/clip_g file (tests/support/
embedding_files.py) in `model_store/embeddings/` and `model_store/sd1/embeddings/`, used by name in the
prompt and the negative prompt. Each image equals diffusers' StableDiffusion(XL)Pipeline with
``load_textual_inversion`` on the same file, same start noise and sigmas, within 2/255 per pixel.
Listings (A1111's and ComfyUI's), files appearing while the server runs, hostile files, and the names
on the A1111 and OpenAI routes (ComfyUI's ``embedding:name`` spelling too)."""

from __future__ import annotations

import base64
import copy
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")

from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from service.models.store import ModelStore  # noqa: E402
from service.sampling.noise import make_noise  # noqa: E402
from tests.support.embedding_files import a1111_pt, emb_params, pickled_code, sdxl_pair, vectors  # noqa: E402
from tests.support.lora_files import euler_sigmas, reference_pipeline  # noqa: E402
from tests.support.sd_tiny import tiny_sd_store  # noqa: E402
from tests.support.server import running  # noqa: E402

# The tiny random models barely react to prompts (another word moves the image by 1/255 at CFG 5): a
# high CFG and several vectors of a few times CLIP's scale make the embeddings' effect 10-40/255.
STEPS, CFG, SEED, STD = 4, 20.0, 11, 2.0
# model -> (prompt, negative prompt) naming its embeddings: "emb" (A1111 .pt in sd1/embeddings/),
# "neg" (kohya emb_params, shared, width 32: SD1 only), "xl" (clip_l + clip_g, shared: SDXL only)
PROMPTS = {"sd1": ("a red emb cat", "the dog neg"), "sdxl": ("a red xl cat", "the xl dog")}
PLAIN = ("a red cat", "the dog")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, dict[str, Any]]]:
    root = tmp_path_factory.mktemp("embedding-store")
    tiny = tiny_sd_store()
    (root / "sd1").mkdir()  # the tiny model's files, plus an embeddings/ folder of its own
    for entry in (tiny / "sd1").iterdir():
        (root / "sd1" / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    (root / "sdxl").symlink_to(tiny / "sdxl", target_is_directory=True)
    models = {name: ModelStore(tiny).load(name) for name in ("sd1", "sdxl")}
    a1111_pt(root / "sd1" / "embeddings" / "emb.pt", vectors(6, 32, 1, STD))
    emb_params(root / "embeddings" / "neg.safetensors", vectors(4, 32, 2, STD))
    sdxl_pair(root / "embeddings" / "xl.safetensors", vectors(8, 32, 3, 2 * STD), vectors(8, 48, 4, 2 * STD))
    pickled_code(root / "embeddings" / "evil.pt", root / "code-ran", vectors(1, 32, 5))
    (root / "embeddings" / "corrupt.safetensors").write_bytes(b"\xff" * 64)
    with running(root, root.parent / "server.log") as server:
        yield server.url, root, models


def _png(b64: str) -> np.ndarray:
    img = Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")
    return np.asarray(img, dtype=np.int16)


def _ours(url: str, model: str, prompt: str, negative: str, sigmas: list[float]) -> np.ndarray:
    body = {"model": model, "prompt": prompt, "negative_prompt": negative, "seed": SEED, "sampler": "euler",
            "sigmas": sigmas, "cfg_scale": CFG, "width": 64, "height": 64}  # fmt: skip
    r = httpx.post(f"{url}/sample", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return _png(r.json()["images"][0])


def _diffusers(model: Any, root: Path, prompt: str, negative: str, embeddings: bool) -> np.ndarray:
    """diffusers' pipeline with the files loaded by its own load_textual_inversion, from the service's
    start noise (tokenizers copied: diffusers adds the names to them)."""
    pipe = reference_pipeline(model, None, 1.0)
    pipe.tokenizer = copy.deepcopy(pipe.tokenizer)
    if model.text_model.is_sdxl:
        pipe.tokenizer_2 = copy.deepcopy(pipe.tokenizer_2)
    if embeddings and model.text_model.is_sdxl:
        xl = load_file(root / "embeddings" / "xl.safetensors")
        pipe.load_textual_inversion(
            xl["clip_l"], token="xl", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
        )
        pipe.load_textual_inversion(
            xl["clip_g"], token="xl", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
        )
    elif embeddings:
        pipe.load_textual_inversion(str(root / "sd1" / "embeddings" / "emb.pt"), token="emb")
        pipe.load_textual_inversion(str(root / "embeddings" / "neg.safetensors"), token="neg")
    noise = make_noise((1, 4, 8, 8), [SEED])  # the service's start noise for this seed
    with torch.inference_mode():
        out = pipe(prompt, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=CFG,
                   height=64, width=64, latents=noise, output_type="np").images[0]  # fmt: skip
    return np.asarray(np.round(np.clip(out, 0, 1) * 255), dtype=np.int16)


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_embeddings_match_diffusers_load_textual_inversion_over_http(
    served: tuple[str, Path, dict[str, Any]], name: str
) -> None:
    url, root, models = served
    model = models[name]
    sigmas = euler_sigmas(model, STEPS)
    prompt, negative = PROMPTS[name]
    ours = _ours(url, name, prompt, negative, sigmas)
    want = _diffusers(model, root, prompt, negative, embeddings=True)
    plain = _ours(url, name, *PLAIN, sigmas)
    assert (
        np.abs(plain - _diffusers(model, root, *PLAIN, embeddings=False)).max() <= 2
    )  # the comparison holds
    effect, err = int(np.abs(want - plain).max()), int(np.abs(ours - want).max())
    print(f"{name}: max |ours - diffusers| {err}/255, embeddings' effect {effect}/255")
    assert effect > 10, "the embeddings must change the image for the test to mean anything"
    assert err <= 2, f"max |ours - diffusers| = {err}/255 on {name}"
    comfy = _ours(
        url,
        name,
        *(p.replace(" emb ", " embedding:emb ").replace(" xl", " embedding:xl") for p in PROMPTS[name]),
        sigmas,
    )
    assert np.array_equal(comfy, ours)  # ComfyUI's spelling is the same embedding


def test_listings_hostile_files_and_files_appearing(served: tuple[str, Path, dict[str, Any]]) -> None:
    url, root, _ = served
    with httpx.Client(base_url=url, timeout=120) as c:
        assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sd1"}).status_code == 200
        listing = c.get("/sdapi/v1/embeddings").json()
        assert listing["loaded"] == {
            "emb": {"step": 1500, "sd_checkpoint": "a9263745", "sd_checkpoint_name": "v1-5-pruned-emaonly",
                    "shape": 32, "vectors": 6},
            "neg": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 32,
                    "vectors": 4},
        }  # fmt: skip
        reasons = {k: v["reason"] for k, v in listing["skipped"].items()}
        assert set(reasons) == {"xl", "evil", "corrupt"} and "does not fit" in reasons["xl"]
        assert "needs Python code" in reasons["evil"] and not (root / "code-ran").exists()
        assert reasons["corrupt"].startswith("unreadable")
        assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sdxl"}).status_code == 200
        xl = c.get("/sdapi/v1/embeddings").json()
        assert set(xl["loaded"]) == {"xl"} and xl["loaded"]["xl"]["shape"] == 80  # 32 + 48, as A1111 sums
        assert set(xl["skipped"]) == {"neg", "evil", "corrupt"}  # sd1's own emb is not sdxl's
        names = ["corrupt", "emb", "evil", "neg", "xl"]
        assert c.get("/embeddings").json() == names and c.get("/api/embeddings").json() == names
        # a file dropped in while the server runs is there on the next listing (and prompt)
        a1111_pt(root / "embeddings" / "sub" / "late.pt", vectors(4, 32, 9))
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "sdxl"
        assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sd1"}).status_code == 200
        assert c.get("/sdapi/v1/embeddings").json()["loaded"]["late"]["vectors"] == 4
        assert "sub/late" in c.get("/embeddings").json()
        r = c.post("/sdapi/v1/refresh-embeddings")
        assert r.status_code == 200 and r.json() is None
        assert "late" in c.get("/sdapi/v1/embeddings").json()["loaded"]


def test_names_work_on_the_a1111_and_openai_routes(served: tuple[str, Path, dict[str, Any]]) -> None:
    url = served[0]

    def a1111(prompt: str, negative: str = "") -> httpx.Response:
        body = {"prompt": prompt, "negative_prompt": negative, "seed": SEED, "steps": 3, "cfg_scale": CFG,
                "width": 64, "height": 64, "override_settings": {"sd_model_checkpoint": "sd1"}}  # fmt: skip
        return httpx.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=120)

    def openai(prompt: str) -> httpx.Response:
        body = {"model": "sd1", "prompt": prompt, "size": "64x64", "seed": SEED, "steps": 3, "cfg_scale": CFG,
                "negative_prompt": "the dog neg", "response_format": "b64_json"}  # fmt: skip
        return httpx.post(f"{url}/v1/images/generations", json=body, timeout=120)

    images = {}
    for spelling in ("a red emb cat", "a red embedding:emb cat", "a red cat"):
        r = a1111(spelling, "the dog neg")
        assert r.status_code == 200, r.text
        images[spelling] = _png(r.json()["images"][0])
        o = openai(spelling)
        assert o.status_code == 200, o.text
        images["openai " + spelling] = _png(o.json()["data"][0]["b64_json"])
    for route in ("", "openai "):
        assert np.array_equal(images[route + "a red emb cat"], images[route + "a red embedding:emb cat"])
        assert np.abs(images[route + "a red emb cat"] - images[route + "a red cat"]).max() > 10
    bad = a1111("a cat", "embedding:missing")
    assert bad.status_code == 422, bad.text
    assert "negative_prompt" in str(bad.json()["detail"]) and "emb" in str(bad.json()["detail"])
    o = openai("a embedding:xl cat")  # the SDXL file does not fit sd1
    assert o.status_code == 400, o.text
    assert o.json()["error"]["param"] == "prompt" and "does not fit" in o.json()["error"]["message"]

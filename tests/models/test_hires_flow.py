"""Hires fix on the flow models (SD3, Flux) over HTTP against diffusers: our /sample with ``hires``
equals diffusers' txt2img pipeline (latents out), ``F.interpolate`` of those latents, then its
img2img pipeline at twice the size with strength ``denoise`` over ``int(steps / denoise)`` steps
(the flow start rule: ``(1 - t0) init + t0 noise``, the noise from the same seed), within 2/255."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from PIL import Image

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")

from service.models.flow_loader import load_flow_diffusers  # noqa: E402
from tests.support.flow_tiny import SIZE, T5_LEN, diffusers_pipeline, tiny_flow_store  # noqa: E402
from tests.support.sse import sse_events  # noqa: E402

PROMPT, SEED, STEPS, HR_STEPS, DENOISE = "the red cat", 7, 4, 3, 0.5
CASES = {"sd3": ("StableDiffusion3", {"cfg_scale": 3.0}), "flux_dev": ("Flux", {"guidance": 3.5})}


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    from service.api.app import create_app
    from service.api.settings import Settings

    settings = Settings(model_store=tiny_flow_store(), torch_threads=1, batch_wait_ms=0)
    with TestClient(create_app(settings)) as c:
        yield c


def _diffusers(name: str, folder: Path, mode: str = "bilinear") -> np.ndarray:
    prefix, extra = CASES[name]
    components = load_flow_diffusers(folder)
    kw: dict[str, Any] = {"generator": torch.Generator().manual_seed(SEED), "max_sequence_length": T5_LEN}
    kw["guidance_scale"] = extra.get("cfg_scale", extra.get("guidance"))
    first_pipe = diffusers_pipeline(components, folder, f"{prefix}Pipeline")
    with torch.inference_mode():
        first = first_pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="latent",
                           **kw).images  # fmt: skip
    if prefix == "Flux":  # packed 2x2 patches -> [B, C, h, w]
        first = first_pipe._unpack_latents(first, SIZE, SIZE, first_pipe.vae_scale_factor)
    up = F.interpolate(first, scale_factor=2, mode=mode)
    kw["generator"] = torch.Generator().manual_seed(SEED)
    img2img = diffusers_pipeline(components, folder, f"{prefix}Img2ImgPipeline")
    with torch.inference_mode():
        size = {"height": 2 * SIZE, "width": 2 * SIZE}
        out = img2img(PROMPT, image=up, strength=DENOISE, num_inference_steps=int(HR_STEPS / DENOISE),
                      output_type="np", **size, **kw).images[0]  # fmt: skip
    return np.asarray(np.round(np.clip(out, 0, 1) * 255), dtype=np.int16)


@pytest.mark.parametrize("name", list(CASES))
def test_flow_hires_fix_matches_diffusers(client: TestClient, name: str) -> None:
    extra = CASES[name][1]
    body = {"model": name, "prompt": PROMPT, "seed": SEED, "steps": STEPS, "sampler": "euler",
            "schedule": "flow", "width": SIZE, "height": SIZE, **extra,
            "hires": {"scale": 2, "steps": HR_STEPS, "denoise": DENOISE, "upscaler": "Latent"}}  # fmt: skip
    r = client.post("/sample", json=body)
    assert r.status_code == 200, r.text
    ours = np.asarray(
        Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"), dtype=np.int16
    )
    assert ours.shape == (2 * SIZE, 2 * SIZE, 3)
    want = _diffusers(name, tiny_flow_store() / name)
    err = int(np.abs(ours - want).max())
    other = int(np.abs(ours - _diffusers(name, tiny_flow_store() / name, "nearest")).max())
    print(f"{name}: max |ours - diffusers| {err}/255; vs diffusers with nearest instead {other}/255")
    assert other > 10, "the upscale must show in the image for the comparison to mean anything"
    assert err <= 2, f"{name}: max |ours - diffusers| = {err}/255"


def test_a_hires_job_streams_progress_over_both_passes(client: TestClient) -> None:
    body = {
        "model": "sd3",
        "prompt": PROMPT,
        "seed": 1,
        "steps": 5,
        "width": SIZE,
        "height": SIZE,
        "hires": {"steps": 200, "denoise": 0.5},
    }  # fmt: skip  (long enough to stream a few events)
    r = client.post("/jobs", json=body)
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    events = sse_events(client, f"/jobs/{job}/events")
    assert events[-1][0] == "done", events[-1]
    progress = [d for e, d in events if e == "progress"]
    steps = [d["step"] for d in progress]
    assert steps == sorted(steps) and all(d["total"] == 5 + 200 for d in progress), progress
    assert any(s > 5 for s in steps), steps  # events from the second pass
    view = client.get(f"/jobs/{job}").json()
    assert view["progress"] == {**view["progress"], "step": 205, "total": 205, "fraction": 1.0}
    params = view["result"]["parameters"]
    assert params["hires"]["width"] == 2 * SIZE and params["width"] == SIZE

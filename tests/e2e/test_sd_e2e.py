"""Stable Diffusion end to end: the real loader and store, the batching engine, and (once the API
serves text models) HTTP.

The engine test runs txt2img with two prompts and two samplers, img2img and inpainting as
separate jobs that share UNet calls, and checks every image against the direct driver.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")

from service.engine import Engine, EngineConfig, JobRequest, JobStatus, ModelHandle  # noqa: E402
from service.models.stable_diffusion import TextLoadedModel  # noqa: E402
from service.models.store import ModelStore  # noqa: E402
from service.models.text_generate import generate  # noqa: E402
from service.sampling.ksampler import SamplingSpec  # noqa: E402
from tests.support.sd_tiny import tiny_sd_store  # noqa: E402

INIT = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
MASK = torch.zeros(1, 1, 64, 64)
MASK[..., 32:] = 1

JOBS = [  # prompt, negative, sampler, seeds, cfg, init, mask, denoise
    ("a red cat", "the dog", "euler", [1, 2], 4.0, None, None, 1.0),
    ("the dog", None, "dpmpp_2m", [3], 6.0, None, None, 1.0),
    ("a cat", "", "euler_ancestral", [4], 3.0, INIT, None, 0.6),
    ("a dog", "red", "dpmpp_2m", [5], 3.0, INIT, MASK, 1.0),
]


class Counting:
    """The SD denoiser, recording the rows of each call (keeps its sigma table for the schedules)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.calls = inner, []
        self.sigmas, self.sigma_min, self.sigma_max = inner.sigmas, inner.sigma_min, inner.sigma_max

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return self.inner(x, sigma, **cond)  # type: ignore[no-any-return]


def _request(model: TextLoadedModel, job: tuple) -> JobRequest:
    prompt, neg, sampler, seeds, cfg, init, mask, denoise = job
    assert model.text_model is not None
    inp = model.text_model.job_inputs(prompt, neg, n=len(seeds), cfg_scale=cfg, init_image=init, mask=mask)
    spec = SamplingSpec(sampler, "normal", 4, seeds, denoise=denoise)
    return JobRequest(spec, len(seeds), inp.cond, inp.uncond, cfg, inp.init, inp.mask)


@pytest.mark.parametrize("name", ["sd1file", "sdxl"])
def test_engine_batches_sd_jobs_and_matches_direct_sampling(name: str) -> None:
    model = ModelStore(tiny_sd_store()).load(name)
    assert isinstance(model, TextLoadedModel) and model.text_model is not None
    counting = Counting(model.denoiser)
    handle = ModelHandle(name, counting, model.latent_shape, model.device, model.dtype, model.decode)
    reqs = [_request(model, j) for j in JOBS]

    async def go() -> list:
        engine = Engine(handle, EngineConfig(batch_wait_ms=0))
        engine.start()
        jobs = [engine.submit(r) for r in reqs]
        await asyncio.gather(*(j.wait_done() for j in jobs))
        await engine.stop()
        return jobs

    jobs = asyncio.run(go())
    assert [j.status for j in jobs] == [JobStatus.succeeded] * len(jobs), [j.error for j in jobs]
    assert (
        counting.calls[0] == sum(r.rows for r in reqs) == 10
    )  # every job's cond + uncond rows in one UNet call
    for job, (prompt, neg, sampler, seeds, cfg, init, mask, denoise) in zip(jobs, JOBS, strict=True):
        want = generate(
            model.text_model,
            prompt,
            neg,
            seeds=seeds,
            sampler=sampler,
            schedule="normal",
            steps=4,
            cfg_scale=cfg,
            init_image=init,
            mask=mask,
            denoise=denoise,
        )
        assert job.result.shape == (len(seeds), 3, 64, 64)
        torch.testing.assert_close(job.result, want, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def client() -> Iterator:
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.api.settings import Settings

    settings = Settings(
        model_store=tiny_sd_store(), models=["sd1", "sd1inpaint"], torch_threads=1, batch_wait_ms=0
    )
    with TestClient(create_app(settings)) as c:
        yield c


def _png(t: torch.Tensor) -> str:
    from PIL import Image

    arr = ((t[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    img = Image.fromarray(arr.permute(1, 2, 0).numpy() if arr.shape[0] == 3 else arr[0].numpy())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_http_txt2img_img2img_inpaint_and_bad_input(client) -> None:  # type: ignore[no-untyped-def]
    body = {
        "model": "sd1",
        "prompt": "a red cat",
        "negative_prompt": "dog",
        "steps": 2,
        "seed": 1,
        "cfg_scale": 4.0,
        "sampler": "euler",
        "schedule": "normal",
    }
    r = client.post("/sample", json=body)
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 1
    init = _png(INIT)
    r = client.post("/sample", json={**body, "init_image": init, "denoise": 0.5})
    assert r.status_code == 200, r.text
    r = client.post("/sample", json={**body, "model": "sd1inpaint", "init_image": init, "mask": _png(MASK)})
    assert r.status_code == 200, r.text
    bad = [
        ({"width": 60}, "width"),
        ({"height": 4096}, "height"),
        ({"init_image": "bm90IGFuIGltYWdl"}, "init_image"),
        ({"init_image": init, "mask": _png(torch.zeros(1, 1, 32, 32))}, "mask"),
        ({"class_label": 3}, "class_label"),
    ]
    for extra, field in bad:
        r = client.post("/sample", json={**body, **extra})
        assert r.status_code == 422 and field in r.text, (extra, r.text)


def test_http_jobs_with_two_prompts_and_two_samplers_match_each_alone(client) -> None:  # type: ignore[no-untyped-def]
    """Two queued jobs (different prompts, samplers, guidance, sizes) give what each gives alone."""
    import numpy as np
    from PIL import Image

    bodies = [
        {"model": "sd1", "prompt": "a red cat", "sampler": "dpmpp_2m", "cfg_scale": 5.0, "seed": 7},
        {"model": "sd1", "prompt": "a blue dog", "sampler": "euler_ancestral", "cfg_scale": 3.0, "seed": 8},
        {"model": "sd1", "prompt": "a cat", "sampler": "euler", "seed": 9, "width": 128, "height": 64},
    ]
    bodies = [{**b, "steps": 3, "schedule": "normal"} for b in bodies]
    ids = [client.post("/jobs", json=b).json()["id"] for b in bodies]
    together = []
    for job_id in ids:
        for _ in range(600):
            view = client.get(f"/jobs/{job_id}").json()
            if view["status"] not in ("queued", "running"):
                break
            time.sleep(0.05)
        assert view["status"] == "succeeded", view
        together.append(view["result"]["images"][0])
    for body, image in zip(bodies, together, strict=True):
        alone = client.post("/sample", json=body).json()["images"][0]
        a, b = (np.asarray(Image.open(io.BytesIO(base64.b64decode(s)))).astype(int) for s in (image, alone))
        assert a.shape == b.shape and a.shape[:2] == (body.get("height", 64), body.get("width", 64))
        assert np.abs(a - b).max() <= 1  # uint8 rounding of float32 results equal to ~1e-5

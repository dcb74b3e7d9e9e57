"""A1111's /sdapi/v1/interrupt with the real ``webuiapi`` client against `kdiff serve` on the shipped
digits model and on a tiny Stable Diffusion model (random weights, diffusers layout): the blocked
txt2img call gets the images as they stand (each one's latest denoised prediction, through the VAE
for the latent model), with ``interrupted: true``, as A1111 returns them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import webuiapi

from tests.support.sd_tiny import frontend_server
from tests.support.server import Server

STEPS = 5000  # far more than the interrupt lets run


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with frontend_server(tmp_path_factory, KDIFF_MAX_STEPS="10000", KDIFF_DEFAULT_MODEL="digits") as srv:
        yield srv


def _api(server: Server) -> Any:
    return webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1", sampler="Euler a", steps=STEPS)


def _interrupted(server: Server, prompt: str, size: int, **kwargs: Any) -> Any:
    """webuiapi's txt2img of 2 images, interrupted from a second client once 3 steps have run."""
    api, other = _api(server), _api(server)
    out: dict[str, Any] = {}

    def generate() -> None:
        out["result"] = api.txt2img(prompt=prompt, seed=11, batch_size=2, width=size, height=size, **kwargs)

    t = threading.Thread(target=generate)
    t.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = other.get_progress()["state"]
            if state["job_count"] and state["sampling_step"] >= 3:
                break
            time.sleep(0.05)
        assert state["sampling_step"] >= 3, state
        other.interrupt()
        t.join(60)
    finally:
        if t.is_alive():
            other.interrupt()
            t.join(60)
    result = out["result"]
    assert result.info["interrupted"] is True
    assert len(result.images) == 2 and all(img.size == (size, size) for img in result.images)
    assert result.info["all_seeds"] == [11, 12]
    return result


def test_webuiapi_gets_the_partial_images_back_after_an_interrupt(server: Server) -> None:
    result = _interrupted(server, "a 3", 16, cfg_scale=3.0)
    assert result.images[0].info["parameters"].startswith("a 3\nSteps: 5000, Sampler: Euler a")
    for img in result.images:
        px = np.asarray(img.convert("L")).astype(int)
        # a denoised prediction is an image: the noisy latent (sigma 20) would clip nearly every
        # pixel to 0 or 255; a prediction is mostly in between and not flat
        clipped = np.mean((px == 0) | (px == 255))
        assert clipped < 0.5 and px.std() > 5, (clipped, px.std())
    assert result.images[0].tobytes() != result.images[1].tobytes()  # each image its own prediction


def test_the_partial_images_of_a_latent_model_come_back_too(server: Server) -> None:
    sd1 = {"sd_model_checkpoint": "sd1"}
    result = _interrupted(server, "a cat", 64, cfg_scale=5.0, override_settings=sd1)
    assert result.info["sd_model_name"] == "sd1"
    assert result.images[0].info["parameters"].startswith("a cat\n")
    assert "Steps: 5000" in result.images[0].info["parameters"]
    arrays = [np.asarray(img.convert("RGB")).astype(int) for img in result.images]
    assert all(a.std() > 1 for a in arrays)  # a decoded latent, not a blank placeholder
    assert not np.array_equal(arrays[0], arrays[1])  # each image its own seed's prediction

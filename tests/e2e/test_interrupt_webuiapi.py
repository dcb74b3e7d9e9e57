"""A1111's /sdapi/v1/interrupt with the real ``webuiapi`` client against `kdiff serve` on the shipped
digits model: the blocked txt2img call gets the images as they stand (each one's latest denoised
prediction), with ``interrupted: true``, as A1111 returns them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import webuiapi

from tests.support.server import REPO, Server

STEPS = 5000  # far more than the interrupt lets run


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(REPO / "model_store", tmp_path_factory.mktemp("log") / "server.log", KDIFF_MAX_STEPS="10000")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def _api(server: Server) -> Any:
    return webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1", sampler="Euler a", steps=STEPS)


def test_webuiapi_gets_the_partial_images_back_after_an_interrupt(server: Server) -> None:
    api, other = _api(server), _api(server)
    out: dict[str, Any] = {}

    def generate() -> None:
        out["result"] = api.txt2img(prompt="a 3", seed=11, batch_size=2, width=16, height=16, cfg_scale=3.0)

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
    assert len(result.images) == 2 and all(img.size == (16, 16) for img in result.images)
    assert result.info["all_seeds"] == [11, 12]
    assert result.images[0].info["parameters"].startswith("a 3\nSteps: 5000, Sampler: Euler a")
    for img in result.images:
        px = np.asarray(img.convert("L")).astype(int)
        # a denoised prediction is an image: the noisy latent (sigma 20) would clip nearly every
        # pixel to 0 or 255; a prediction is mostly in between and not flat
        clipped = np.mean((px == 0) | (px == 255))
        assert clipped < 0.5 and px.std() > 5, (clipped, px.std())
    assert result.images[0].tobytes() != result.images[1].tobytes()  # each image its own prediction

"""Progress previews of latent models: their VAE decodes the latest prediction (from a latent
downsized to PREVIEW_LATENT), for SSE progress events and A1111's /progress current_image."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from service.models.store import ModelStore  # noqa: E402
from service.serving.previews import PREVIEW_LATENT, render  # noqa: E402
from tests.support.sd_tiny import tiny_sd_store  # noqa: E402
from tests.support.sse import sse_events  # noqa: E402


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    from service.api.app import create_app
    from service.api.settings import Settings

    settings = Settings(
        model_store=tiny_sd_store(), models=["sd1"], torch_threads=1, batch_wait_ms=0, max_steps=10_000
    )
    with TestClient(create_app(settings)) as c:
        yield c


def _png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_render_decodes_a_downsized_latent_with_the_models_vae() -> None:
    model = ModelStore(tiny_sd_store()).load("sd1")
    assert model.decode is not None
    latent = torch.randn(4, 16, 24, generator=torch.Generator().manual_seed(0))
    img = _png(render(model, latent, 256))
    assert img.size == (24 * 8, 16 * 8)  # small enough: decoded as it is
    big = torch.randn(4, 96, 64, generator=torch.Generator().manual_seed(1))
    small = torch.nn.functional.interpolate(big[None], size=(PREVIEW_LATENT, 21), mode="area")[0]
    # a large latent is averaged down first: the same pixels as decoding that small latent
    assert _png(render(model, big, 512)).tobytes() == _png(render(model, small, 512)).tobytes()


def test_sse_progress_events_of_a_latent_model_carry_previews(client: TestClient) -> None:
    body = {"prompt": "a cat", "steps": 4, "seed": 1, "width": 64, "height": 64}
    job = client.post("/jobs", json=body).json()
    events = sse_events(client, f"/jobs/{job['id']}/events?preview=true")
    assert events[-1][0] == "done"
    previews = [d["preview"] for e, d in events if e == "progress" and "preview" in d]
    assert previews and all(_png(p).size == (64, 64) for p in previews)


def test_a1111_progress_shows_the_current_image_of_a_latent_model(client: TestClient) -> None:
    headers = {"Authorization": "Bearer p"}
    done: dict[str, Any] = {}
    body = {"prompt": "a cat", "steps": 2_000, "width": 64, "height": 64}
    t = threading.Thread(
        target=lambda: done.update(r=client.post("/sdapi/v1/txt2img", json=body, headers=headers))
    )
    t.start()
    try:
        deadline, p = time.monotonic() + 30, {}
        while time.monotonic() < deadline:
            p = client.get("/sdapi/v1/progress", headers=headers).json()
            if p["state"]["sampling_step"] > 0 and p["current_image"]:
                break
            time.sleep(0.05)
        assert p["current_image"], p
        assert _png(p["current_image"]).size == (64, 64)
        skipped = client.get("/sdapi/v1/progress?skip_current_image=true", headers=headers).json()
        assert skipped["current_image"] is None
    finally:
        client.post("/sdapi/v1/interrupt", headers=headers)
        t.join(30)
    assert done["r"].status_code == 200

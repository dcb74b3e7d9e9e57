"""webuiapi (the PyPI A1111 client) against a live server with an upscaler model: its
``get_upscalers`` / ``get_latent_upscale_modes`` listings, ``extra_single_image`` and
``extra_batch_images`` (the result equals spandrel's inference on the same file), and an unknown
upscaler refused with a 422 that names the ones available."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webuiapi

from tests.support import upscaler_files as uf
from tests.support.hostile_images import noisy
from tests.support.server import Server
from tests.support.tiny_store import make_tiny_store

KEY = "sk-upscale"
NAME = "realesr-general-x4v3"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_tiny_store(tmp_path_factory.mktemp("upscale-store"))
    uf.write(root / "upscalers" / f"{NAME}.pth", uf.compact(num_conv=8, nf=16), "params")
    return root


@pytest.fixture(scope="module")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(
        store, tmp_path_factory.mktemp("log") / "server.log", KDIFF_API_KEYS=KEY, KDIFF_UPSCALER_TILE="32"
    )
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def _api(server: Server) -> Any:
    api = webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1")
    api.session.headers["Authorization"] = f"Bearer {KEY}"
    return api


def test_webuiapi_extras_against_spandrel(server: Server, store: Path) -> None:
    api = _api(server)
    assert [u["name"] for u in api.get_upscalers()] == ["None", "Lanczos", "Nearest", NAME]
    assert [m["name"] for m in api.get_latent_upscale_modes()][0] == "Latent"
    img = noisy((48, 40), seed=9)
    result = api.extra_single_image(image=img, upscaler_1=NAME, upscaling_resize=4)
    assert result.image.size == (192, 160)
    assert "Postprocess upscaler: realesr-general-x4v3" in result.info
    run, _, _ = uf.spandrel_model(store / "upscalers" / f"{NAME}.pth")
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    want = np.round(run(x).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).astype(np.int16)
    got = np.asarray(result.image.convert("RGB"), dtype=np.int16)
    assert np.abs(got - want).max() <= 2, np.abs(got - want).max()  # 32 px tiles, 16 px of context
    batch = api.extra_batch_images(images=[img, img.transpose(0)], upscaler_1=NAME, upscaling_resize=2)
    assert [i.size for i in batch.images] == [(96, 80), (96, 80)]
    with pytest.raises(RuntimeError) as err:
        api.extra_single_image(image=img, upscaler_1="R-ESRGAN 4x+")
    status, text = err.value.args
    assert status == 422 and "R-ESRGAN 4x+" in text and NAME in text

"""DeepCache on Stable Diffusion over HTTP (tiny random SD 1.x and SDXL in diffusers' layout, with a
LoRA, IP-Adapters and a ControlNet): the request's ``cache`` recorded and reproducing its image,
interval 1 the uncached image exactly, cached and uncached requests sent together sharing UNet calls
with each image its solo one, a hires fix's second pass, A1111's DeepCache options, and every row's
cache gone when its job ends."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")

from service.images import read_parameters  # noqa: E402
from service.models.stepcache import STORE  # noqa: E402
from tests.models.test_controlnet_http import _pixels, _rows  # noqa: E402
from tests.models.test_ipadapter import png  # noqa: E402
from tests.support.ipadapter_tiny import ip_store  # noqa: E402
from tests.support.lora_files import kohya_file, save  # noqa: E402

STEPS = 4
BODY = {"prompt": "a red cat", "negative_prompt": "a dog", "steps": STEPS, "seed": 3, "sampler": "euler"}
BODY |= {"width": 64, "height": 64, "cfg_scale": 5.0}
DC2, DC3 = {"method": "deepcache", "interval": 2}, {"method": "deepcache", "interval": 3}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared IP-Adapter store's models, adapters and ControlNet, plus a LoRA of our own."""
    from service.models.store import ModelStore

    shared, _ = ip_store()
    root = tmp_path_factory.mktemp("stepcache-sd")
    for name in ("sd1", "sdxl", "ipadapter", "controlnet"):
        (root / name).symlink_to(shared / name, target_is_directory=True)
    sd = ModelStore(root).load("sd1").text_model  # type: ignore[attr-defined]
    save(kohya_file(sd.unet, list(sd.components.text_encoders), seed=5), root / "loras" / "red.safetensors")
    return root


def _client(root: Path, **settings: Any) -> TestClient:
    from service.api.app import create_app
    from service.api.settings import Settings

    return TestClient(create_app(Settings(model_store=root, torch_threads=1, batch_wait_ms=100, **settings)))


@pytest.fixture(scope="module")
def client(root: Path) -> Iterator[TestClient]:
    with _client(root) as c:
        yield c


def _post(client: TestClient, path: str = "/sample", **body: Any) -> dict[str, Any]:
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _image(out: dict[str, Any]) -> np.ndarray:
    return _pixels(out["images"][0])


@pytest.mark.parametrize("model", ["sd1", "sdxl"])
def test_cached_requests_record_reproduce_and_differ(client: TestClient, model: str) -> None:
    before = len(STORE)
    plain = _post(client, **BODY, model=model)
    cached = _post(client, **BODY, model=model, cache={"method": "deepcache"})
    params = read_parameters(base64.b64decode(cached["images"][0]))
    assert params["cache"] == {"method": "deepcache", "interval": 3} == cached["parameters"]["cache"]
    again = _post(client, **BODY, model=model, cache=params["cache"])
    assert again["images"] == cached["images"]
    assert not np.array_equal(_image(cached), _image(plain))  # the cache acted (a tiny random VAE: faintly)
    every = _post(client, **BODY, model=model, cache={"method": "deepcache", "interval": 1})
    assert np.array_equal(_image(every), _image(plain))  # interval 1: every evaluation full
    assert len(STORE) == before  # every row's cache gone with its job


LORA = {"loras": [{"name": "red", "weight": 0.9}]}
IP = {"ip_adapters": [{"model": "ip-adapter_sd15", "image": png(5), "weight": 0.8}]}
CN = {"controlnets": [{"model": "cn_a", "image": png(7, (64, 64))}]}
MIXED: list[dict[str, Any]] = [
    {},
    {"cache": DC2},
    {"cache": DC3, **LORA},
    {"cache": DC2, **IP},
    {"cache": DC3, **CN},
]
MIXED += [LORA, IP]


def _together(
    client: TestClient, bodies: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each body's image alone, then all sent at once (checked to share UNet calls, and that no shared
    call failed: the engine would retry it job by job, hiding a wrong row binding in the results)."""
    solo = [_image(_post(client, **b)) for b in bodies]
    before, rows_before = len(STORE), _rows(client.get("/metrics").text)
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = [_image(f.result()) for f in [pool.submit(_post, client, **b) for b in bodies]]
    rows, calls = np.subtract(_rows(client.get("/metrics").text), rows_before)
    assert calls < rows / 2, f"{rows} rows in {calls} calls: no sharing"
    assert len(STORE) == before  # every row's cache gone with its job
    assert not [r.getMessage() for r in caplog.records if "retrying job by job" in r.getMessage()]
    return solo, together


def test_mixed_requests_share_calls_and_each_is_its_solo_image(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Plain, interval 2, interval 3 + a LoRA, interval 2 + an IP-Adapter, interval 3 + a ControlNet,
    plain + the LoRA and plain + the adapter sent together: the uncached ones are their solo images
    exactly (batch-invariant calls), the cached ones within a pixel level."""
    bodies = [{**BODY, "model": "sd1", "seed": 20 + i, **b} for i, b in enumerate(MIXED)]
    solo, together = _together(client, bodies, caplog)
    for i in (2, 3, 4):  # the LoRA, the adapter and the ControlNet act on the cached requests too
        bare = {k: v for k, v in bodies[i].items() if k not in ("loras", "ip_adapters", "controlnets")}
        assert not np.array_equal(_image(_post(client, **bare)), solo[i]), i
    for i, b in enumerate(bodies):
        gap = np.abs(together[i].astype(int) - solo[i]).max()
        assert gap == 0 if "cache" not in b else gap <= 1, (i, gap)


def test_without_batch_invariance_lora_and_adapter_rows_follow_the_deep_part(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """KDIFF_INVARIANT_ROWS=0: the deep part runs on the rows that need it only, with their LoRA
    scales and image tokens re-bound to them; each image is its solo one within a pixel level. The
    cached requests at levels 2, 0, 1 and 3: split points nested in one call, the rows of the deeper
    levels (the LoRA's, the adapter's, the ControlNet's) re-bound at each."""
    levels = iter([2, 0, 1, 3])
    mixed = [{**b, "cache": {**b["cache"], "level": next(levels)}} if "cache" in b else b for b in MIXED]
    bodies = [{**BODY, "model": "sd1", "seed": 40 + i, **b} for i, b in enumerate(mixed)]
    try:
        with _client(root, invariant_rows=0) as c:
            assert not STORE.fixed_shape
            STORE.reset_counts()
            solo, together = _together(c, bodies, caplog)
            assert STORE.padded == 0 and STORE.reused > 0
    finally:
        STORE.fixed_shape = True  # as the module's batch-invariant server set it
    for i in range(len(bodies)):
        assert np.abs(together[i].astype(int) - solo[i]).max() <= 1, i


def test_a_hires_fix_caches_both_passes(client: TestClient) -> None:
    hires = {"scale": 2, "steps": 4, "denoise": 0.6, "upscaler": "Latent"}
    body = {**BODY, "model": "sd1", "hires": hires}
    plain = _image(_post(client, **body))
    every = _post(client, **body, cache={"method": "deepcache", "interval": 1})
    assert np.array_equal(_image(every), plain)
    cached = _post(client, **body, cache=DC2)
    assert cached["parameters"]["cache"] == DC2 and _image(cached).shape == (128, 128, 3)
    assert not np.array_equal(_image(cached), plain)


def test_a1111_deepcache_options_on_sd(client: TestClient) -> None:
    a1111 = {
        "prompt": "a red cat",
        "steps": STEPS,
        "sampler_name": "Euler",
        "seed": 3,
        "width": 64,
        "height": 64,
    }
    a1111 |= {"override_settings": {"sd_model_checkpoint": "sdxl"}}
    on = {**a1111, "override_settings": {**a1111["override_settings"], "deepcache_enable": True}}
    on["override_settings"]["deepcache_full_run_step_rate"] = 2
    r = _post(client, "/sdapi/v1/txt2img", **on)
    params = read_parameters(base64.b64decode(r["images"][0]))
    assert params["cache"] == {"method": "deepcache", "interval": 2, "start": 1, "level": 0}  # 40 % of 4
    bad = client.post("/sample", json={**BODY, "model": "sd1", "cache": {"method": "fbcache"}})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][-1] == "cache.method", bad.text
    assert "it runs deepcache" in bad.json()["detail"][0]["msg"]

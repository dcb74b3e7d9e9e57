"""ControlNets in the memory budget (KDIFF_MEMORY_BUDGET): a ControlNet a request loads counts in
its model's memory (GET /models ``memory_bytes``), an idle model is evicted least recently used
first to make room for it, and one that can never fit is a 507 naming the budget, as for loading
a model; the refused unit leaves the model serving requests without it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")

from service.models.controlnet import scan  # noqa: E402
from service.models.controlnet.files import held_bytes, size  # noqa: E402
from service.models.store import ModelStore, memory_bytes  # noqa: E402
from tests.models.test_controlnet_diffusers import control_png  # noqa: E402
from tests.support.controlnet_tiny import make_controlnet, save_folder  # noqa: E402
from tests.support.sd_tiny import save_diffusers, write_manifest  # noqa: E402
from tests.support.tiny_store import make_tiny_store  # noqa: E402

BODY = {"model": "sd1", "prompt": "a cat", "width": 32, "height": 32, "steps": 2, "seed": 1}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    """sd1 (tiny SD 1.x), a (the project's tiny UNet) and cn_a; the bytes each holds loaded."""
    root = tmp_path_factory.mktemp("cn-budget")
    save_diffusers(root / "sd1")
    write_manifest(root / "sd1")
    make_tiny_store(root, name="a")
    net = make_controlnet(seed=1)
    save_folder(net, root / "controlnet" / "cn_a")
    store = ModelStore(root)
    sizes = {name: memory_bytes(store.load(name)) for name in ("sd1", "a")}
    sizes |= {"cn_file": size(scan(root)["cn_a"]), "cn_held": held_bytes(net)}
    return root, sizes


def _client(root: Path, budget: int, models: list[str]) -> TestClient:
    from service.api.app import create_app
    from service.api.settings import Settings

    settings = Settings(
        model_store=root, models=models, memory_budget=budget, torch_threads=1, batch_wait_ms=0, jit=False
    )
    return TestClient(create_app(settings))


def _models(c: TestClient) -> dict[str, Any]:
    return {m["name"]: m for m in c.get("/models").json()["models"]}


def _unit() -> dict[str, Any]:
    return {"model": "cn_a", "image": control_png(3, 32)}


def test_a_controlnet_counts_in_its_model_and_evicts_an_idle_one(root: tuple[Path, dict[str, int]]) -> None:
    store, s = root
    # both models fit; both with the ControlNet do not, sd1 with it does once `a` is gone
    budget = s["sd1"] + s["a"] + s["cn_file"] - 1
    with _client(store, budget, ["a", "sd1"]) as c:
        before = _models(c)
        assert before["sd1"]["memory_bytes"] == s["sd1"] and before["a"]["state"] == "loaded"
        assert c.post("/sample", json={**BODY, "controlnets": [_unit()]}).status_code == 200
        after = _models(c)
        assert after["a"]["state"] == "on_disk"  # evicted for the ControlNet
        assert after["sd1"]["memory_bytes"] == s["sd1"] + s["cn_held"]  # the loaded net's bytes
        memory = c.get("/models").json()["memory"]
        assert memory["used_bytes"] == s["sd1"] + s["cn_held"] <= memory["budget_bytes"]
        # the ControlNet stays loaded with its model: a second request loads nothing more
        assert c.post("/sample", json={**BODY, "controlnets": [_unit()]}).status_code == 200
        assert _models(c)["sd1"]["memory_bytes"] == s["sd1"] + s["cn_held"]


def test_a_controlnet_that_cannot_fit_is_507_naming_the_budget(root: tuple[Path, dict[str, int]]) -> None:
    store, s = root
    budget = s["sd1"] + s["cn_file"] // 2  # sd1 fits, sd1 with cn_a never does
    with _client(store, budget, ["sd1"]) as c:
        r = c.post("/sample", json={**BODY, "controlnets": [_unit()]})
        assert r.status_code == 507, r.text
        msg = r.json()["detail"]["message"]
        assert "with its ControlNets" in msg and "KDIFF_MEMORY_BUDGET" in msg and str(budget) in msg
        assert _models(c)["sd1"]["memory_bytes"] == s["sd1"]  # nothing kept for the refused one
        assert c.post("/sample", json=BODY).status_code == 200  # the model still serves

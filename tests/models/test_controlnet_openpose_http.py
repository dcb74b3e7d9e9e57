"""``openpose`` over HTTP with a random ``body_pose_model.pth`` (the published key names) in
``model_store/annotators/``: listed by /controlnet/module_list and control_types only while the file
is there, /controlnet/detect returns the pose image (test_controlnet_openpose.py shows it is
controlnet_aux's), a unit with module openpose drives a ControlNet end to end exactly as the same
unit given that pose image with module none, a bomb is refused by the image gate, a weight
file that is not one is a 422 naming it, the pose networks are asked for on the model's device, and
the detection runs off the event loop."""

from __future__ import annotations

import base64
import io
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")
pytest.importorskip("cv2", reason="the test oracles (make setup) are not installed")

from service.models.controlnet import openpose  # noqa: E402
from tests.models.test_controlnet_openpose import figure  # noqa: E402
from tests.support.controlnet_tiny import make_controlnet, save_folder  # noqa: E402
from tests.support.hostile_images import bomb_png  # noqa: E402
from tests.support.openpose_files import link_body_model  # noqa: E402
from tests.support.sd_tiny import save_diffusers, write_manifest  # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("openpose-http")
    save_diffusers(root / "sd1")
    write_manifest(root / "sd1")
    save_folder(make_controlnet(seed=1), root / "controlnet" / "cn_openpose")
    link_body_model(root)
    return root


@pytest.fixture(scope="module")
def client(root: Path) -> Iterator[TestClient]:
    from service.api.app import create_app
    from service.api.settings import Settings

    with TestClient(create_app(Settings(model_store=root, torch_threads=1, jit=False))) as c:
        yield c


def _b64(img: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


PICTURE = figure(256, 192)


def _sample(client: TestClient, unit: dict[str, Any] | None) -> np.ndarray:
    body = {"model": "sd1", "prompt": "a dancer", "steps": 2, "seed": 3, "width": 64, "height": 64}
    r = client.post("/sample", json={**body, "controlnets": [unit] if unit else []})
    assert r.status_code == 200, r.text
    return _pixels(r.json()["images"][0])


def test_listed_detected_and_driving_a_controlnet(
    client: TestClient, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    devices: list[str] = []  # where each route asks the pose network to run: the model's device
    net = openpose._net
    monkeypatch.setattr(
        openpose, "_net", lambda p, load, device=None: (devices.append(str(device)), net(p, load, device))[1]
    )
    listed = client.get("/controlnet/module_list").json()
    assert "openpose" in listed["module_list"] and listed["module_detail"]["openpose"]["model_free"] is False
    for name in ("openpose_hand", "openpose_face", "openpose_faceonly", "openpose_full"):
        assert name not in listed["module_list"]  # their hand / face networks are not provided yet
    pose_type = client.get("/controlnet/control_types").json()["control_types"]["OpenPose"]
    assert pose_type["default_option"] == "openpose" and pose_type["default_model"] == "cn_openpose"
    r = client.post(
        "/controlnet/detect",
        json={
            "controlnet_module": "openpose",
            "controlnet_input_images": [_b64(PICTURE)],
            "controlnet_processor_res": -1,
        },
    )
    assert r.status_code == 200, r.text
    pose = _pixels(r.json()["images"][0])
    assert np.array_equal(pose, openpose.run(root / "annotators", "openpose", PICTURE))
    assert (pose > 0).any(axis=2).sum() > 500  # people were found and drawn
    assert devices == ["cpu", "None"]  # /controlnet/detect: the pool's device; the direct call: none
    # the unit's control image is that pose image: the same result as giving it with module none
    unit = {"model": "cn_openpose", "image": _b64(PICTURE), "weight": 1.5, "resize_mode": "Just Resize"}
    with_module = _sample(client, {**unit, "module": "openpose"})
    assert np.array_equal(with_module, _sample(client, {**unit, "image": _b64(pose), "module": "none"}))
    assert not np.array_equal(with_module, _sample(client, {**unit, "module": "none"}))
    assert devices[2:] == ["cpu"]  # a unit's image: the loaded model's device (its ControlSet's)


def test_bomb_is_refused_and_absent_weights_are_a_422(client: TestClient, root: Path) -> None:
    bomb = base64.b64encode(bomb_png(12000, 12000)).decode()
    r = client.post(
        "/controlnet/detect", json={"controlnet_module": "openpose", "controlnet_input_images": [bomb]}
    )
    assert r.status_code in (413, 422) and "image" in r.text
    away = root / "annotators.away"
    shutil.move(str(root / "annotators"), away)
    try:
        assert "openpose" not in client.get("/controlnet/module_list").json()["module_list"]
        assert "OpenPose" not in client.get("/controlnet/control_types").json()["control_types"]
        r = client.post(
            "/controlnet/detect",
            json={"controlnet_module": "openpose", "controlnet_input_images": [_b64(PICTURE)]},
        )
        assert r.status_code == 422 and "canny" in r.text and "'openpose'" in r.text
        unit = {"model": "cn_openpose", "image": _b64(PICTURE), "module": "openpose"}
        r = client.post("/sample", json={"model": "sd1", "prompt": "x", "steps": 2, "controlnets": [unit]})
        assert r.status_code == 422 and "controlnets[0].module" in r.text and "canny" in r.text
        # a file of that name that is no weight file: listed, then a 422 naming the file
        (root / "annotators").mkdir()
        (root / "annotators" / "body_pose_model.pth").write_bytes(b"<html>not found</html>")
        r = client.post(
            "/controlnet/detect",
            json={"controlnet_module": "openpose", "controlnet_input_images": [_b64(PICTURE)]},
        )
        assert (
            r.status_code == 422 and "controlnet_module" in r.text and "not a readable weight file" in r.text
        )
        r = client.post("/sample", json={"model": "sd1", "prompt": "x", "steps": 2, "controlnets": [unit]})
        assert r.status_code == 422 and "controlnets[0].module" in r.text and "body_pose_model.pth" in r.text
    finally:
        shutil.rmtree(root / "annotators", ignore_errors=True)
        shutil.move(str(away), root / "annotators")


def test_pose_detection_runs_off_the_event_loop(
    client: TestClient, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a pose detection works (held 1.5 s here), for /controlnet/detect and for a unit's
    image in /sample, the server answers /healthz at once: the work is in a worker thread."""
    from service.models.controlnet import openpose_body

    started, detect = threading.Event(), openpose_body.detect

    def slow(net: Any, rgb: np.ndarray) -> Any:
        started.set()
        time.sleep(1.5)  # a blocking wait: on the event loop it would hold every request
        return detect(net, rgb)

    monkeypatch.setattr(openpose_body, "detect", slow)
    unit = {"model": "cn_openpose", "image": _b64(PICTURE), "module": "openpose"}
    calls = [
        lambda: client.post(
            "/controlnet/detect",
            json={"controlnet_module": "openpose", "controlnet_input_images": [_b64(PICTURE)]},
        ),
        lambda: client.post(
            "/sample",
            json={
                "model": "sd1",
                "prompt": "x",
                "steps": 2,
                "width": 64,
                "height": 64,
                "controlnets": [unit],
            },
        ),
    ]
    for call in calls:
        started.clear()
        done: list[int] = []
        worker = threading.Thread(target=lambda c=call, d=done: d.append(c().status_code))
        worker.start()
        assert started.wait(30)
        t0 = time.perf_counter()
        assert client.get("/healthz").status_code == 200
        waited = time.perf_counter() - t0
        assert not done and waited < 0.75, waited  # answered while the detection still ran
        worker.join(60)
        assert done == [200]

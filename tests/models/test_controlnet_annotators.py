"""Model-based preprocessors from ``model_store/annotators/``: Depth Anything in the transformers
layout (``LiheYoung/depth-anything-small-hf``'s files: config.json, model.safetensors,
preprocessor_config.json) with tiny random weights and a 140 px processor size (published: 518).
Listed (``/controlnet/module_list``, ``control_types``) and accepted only while its weights are
there; its output equals transformers' ``depth-estimation`` pipeline's depth image on the same
folder, through ``/controlnet/detect`` and as a unit's control image."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

pytest.importorskip("transformers", reason="the [sd] extra (diffusers, transformers) is not installed")

from transformers import (  # noqa: E402
    DepthAnythingConfig,
    DepthAnythingForDepthEstimation,
    Dinov2Config,
    pipeline,
)

from service.models.controlnet import annotators, preprocess  # noqa: E402
from service.models.controlnet.units import control_image  # noqa: E402
from service.sampling.errors import InputError  # noqa: E402
from tests.support.tiny_store import make_tiny_store  # noqa: E402

# depth-anything-small-hf's preprocessor_config.json, but 140 px (published: 518): a fast test
PROCESSOR = {
    "do_normalize": True,
    "do_pad": False,
    "do_rescale": True,
    "do_resize": True,
    "ensure_multiple_of": 14,
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "DPTImageProcessor",
    "image_std": [0.229, 0.224, 0.225],
    "keep_aspect_ratio": True,
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 140, "width": 140},
}


def save_depth_anything(folder: Path) -> Path:
    """A tiny random Depth Anything saved as the published transformers folders are."""
    torch.manual_seed(0)
    backbone = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64}
    backbone |= {
        "image_size": 518,
        "patch_size": 14,
        "out_indices": [1, 2, 3, 4],
        "reshape_hidden_states": False,
    }
    cfg = DepthAnythingConfig(
        backbone_config=Dinov2Config(**backbone),
        reassemble_hidden_size=32,
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
        patch_size=14,
    )
    DepthAnythingForDepthEstimation(cfg).eval().save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps(PROCESSOR, indent=2))
    return folder


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("annotators")
    make_tiny_store(root, name="digits")
    save_depth_anything(root / "annotators" / "depth_anything")
    return root


def _image(h: int = 45, w: int = 70) -> np.ndarray:
    """A smooth picture with an edge (the depth network sees structure, not only noise)."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // w, y * 255 // h, ((x + y) % 17) * 15], axis=2).astype(np.uint8)
    img[h // 3 : 2 * h // 3, w // 4 : w // 2] = 255
    return img


_pipes: dict[Path, Any] = {}


def _reference(root: Path, img: np.ndarray) -> np.ndarray:
    """transformers' depth-estimation pipeline on the folder (built once per folder)."""
    folder = root / "annotators" / "depth_anything"
    if folder not in _pipes:
        _pipes[folder] = pipeline("depth-estimation", model=str(folder), device="cpu")
    return np.asarray(_pipes[folder](Image.fromarray(img))["depth"].convert("RGB"), dtype=np.int16)


def _b64(img: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("size", [(45, 70), (90, 40)])
def test_depth_anything_equals_the_transformers_pipeline(root: Path, size: tuple[int, int]) -> None:
    img = _image(*size)
    ours = preprocess.run("depth_anything", img, None, None, None, root).astype(np.int16)
    want = _reference(root, img)
    assert ours.shape == want.shape == (*size, 3)
    assert np.abs(ours - want).max() <= 1  # float rounding at the uint8 truncation
    assert len(np.unique(want)) > 50  # a depth map, not a flat image


def test_listed_and_accepted_only_with_its_weights(root: Path, tmp_path: Path) -> None:
    assert annotators.available(root) == ["depth_anything"]
    assert preprocess.module_name("depth_anything", root) == "depth_anything"
    assert annotators.available(tmp_path) == [] and preprocess.module_name("depth_anything", tmp_path) is None
    unit = SimpleNamespace(image=_b64(_image()), module="depth_anything", resize_mode="just_resize")
    with pytest.raises(InputError) as err:
        control_image(unit, 32, 48, "controlnets[0]", tmp_path)
    assert err.value.field == "controlnets[0].module" and "canny" in err.value.allowed
    assert "depth_anything" not in err.value.allowed
    hint = control_image(unit, 32, 48, "controlnets[0]", root)  # the unit's control image: depth, fitted
    want = preprocess.fit(_reference(root, _image()).astype(np.uint8), 48, 32, 0)
    assert np.abs(hint[:3].permute(1, 2, 0).numpy().astype(np.int16) - want).max() <= 1


def test_replaced_weights_load_anew(root: Path, tmp_path: Path) -> None:
    """The network is cached per file version: model.safetensors replaced (as a download tool
    renames a finished file over the old one), the next run uses the new weights."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "annotators" / "depth_anything"
    shutil.copytree(root / "annotators" / "depth_anything", folder)
    img = _image()
    before = annotators.depth_anything(tmp_path, img)
    assert annotators._network(tmp_path)[0] is annotators._network(tmp_path)[0]  # kept while unchanged
    state = load_file(str(folder / "model.safetensors"))
    head = [k for k in state if k.startswith("head.") and k.endswith("weight")][0]
    state[head] = -state[head]  # another network: its depth reads differently
    save_file(state, str(tmp_path / "new.safetensors"), metadata={"format": "pt"})
    os.replace(tmp_path / "new.safetensors", folder / "model.safetensors")
    after = annotators.depth_anything(tmp_path, img).astype(np.int16)
    want = np.asarray(
        pipeline("depth-estimation", model=str(folder), device="cpu")(Image.fromarray(img))["depth"]
    )
    assert not np.array_equal(after, before)
    assert np.abs(after[:, :, 0] - want.astype(np.int16)).max() <= 1


@pytest.fixture(scope="module")
def client(root: Path) -> Iterator[TestClient]:
    from service.api.app import create_app
    from service.api.settings import Settings

    with TestClient(create_app(Settings(model_store=root, torch_threads=1, jit=False))) as c:
        yield c


def test_routes_list_and_run_it(client: TestClient, root: Path) -> None:
    listed = client.get("/controlnet/module_list").json()
    assert listed["module_list"][-1] == "depth_anything" and "canny" in listed["module_list"]
    assert listed["module_detail"]["depth_anything"]["model_free"] is False
    assert client.get("/controlnet/control_types").json()["control_types"]["Depth"]["default_option"] == (
        "depth_anything"
    )
    img = _image(60, 50)
    body = {
        "controlnet_module": "depth_anything",
        "controlnet_input_images": [_b64(img)],
        "controlnet_processor_res": -1,
    }
    r = client.post("/controlnet/detect", json=body)
    assert r.status_code == 200, r.text
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"), np.int16)
    assert np.abs(got - _reference(root, img)).max() <= 1
    # the weights taken away: no longer listed, a detect naming it is a 422 listing what there is
    moved = root / "depth_anything.away"
    shutil.move(str(root / "annotators" / "depth_anything"), moved)
    try:
        assert "depth_anything" not in client.get("/controlnet/module_list").json()["module_list"]
        r = client.post("/controlnet/detect", json=body)
        assert r.status_code == 422 and "depth_anything" in r.text and "canny" in r.text
    finally:
        shutil.move(str(moved), root / "annotators" / "depth_anything")

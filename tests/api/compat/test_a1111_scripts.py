"""A1111's scripts over its API (``modules/api/api.py``): a ``script_name`` or an ``alwayson_scripts``
title it does not have is a 422 there ("Script ... not found", "always on script ... not found"); a
refiner (``refiner_checkpoint``) switches models mid-sampling. Here: no selectable script runs, so
any is a 422 naming ``script_name`` (x/y/z plot sent by a client must not silently come back as one
plain image); ControlNet and A1111's own built-in always-on titles are accepted; an extension this
service lacks is a 422 naming it; a refiner to another model is a 422 naming ``refiner_checkpoint``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.support.compat import info

BASE = {"prompt": "a 7", "steps": 2, "seed": 3, "width": 16, "height": 16}


@pytest.fixture(scope="module")
def a1111(make_client: Callable[..., TestClient]) -> Iterator[TestClient]:
    with make_client() as c:
        yield c


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"script_name": "x/y/z plot", "script_args": [1, "Seed", "1,2,3"]}, "script_name"),
        ({"script_name": "Prompt matrix"}, "script_name"),
        ({"alwayson_scripts": {"ADetailer": {"args": [True, {"ad_model": "face_yolov8n.pt"}]}}}, "ADetailer"),
        ({"alwayson_scripts": {"reactor": {"args": []}}}, "reactor"),
        (
            {"refiner_checkpoint": "sd_xl_refiner_1.0.safetensors [7440042bbd]", "refiner_switch_at": 0.8},
            "refiner_checkpoint",
        ),  # fmt: skip
    ],
)
def test_scripts_that_do_not_run_here_are_422s_naming_them(
    a1111: TestClient, extra: dict[str, Any], field: str
) -> None:
    for route, body in (("txt2img", BASE), ("img2img", {**BASE, "init_images": []})):
        r = a1111.post(f"/sdapi/v1/{route}", json={**body, **extra})
        assert r.status_code == 422, (route, r.text)
        assert r.json()["errors"].startswith(field) or f"alwayson_scripts.{field}" in r.json()["errors"], (
            r.text
        )


@pytest.mark.parametrize(
    "extra",
    [
        {"script_name": None, "script_args": []},  # webuiapi's defaults
        {"script_name": "", "alwayson_scripts": {}},
        {"script_name": "None"},
        {"alwayson_scripts": {"ControlNet": {"args": []}}},  # webuiapi with has_controlnet, no units
        {"alwayson_scripts": {"Refiner": {"args": [False, "", 0.8]}, "Seed": {"args": [-1, False]}}},
        {"refiner_checkpoint": "", "refiner_switch_at": 0.8},
        {"refiner_checkpoint": "None"},
        {"refiner_checkpoint": "tiny.safetensors [0123abcd]"},  # the request's own model: no switch
    ],
)
def test_what_a1111s_api_accepts_runs(a1111: TestClient, extra: dict[str, Any]) -> None:
    r = a1111.post("/sdapi/v1/txt2img", json={**BASE, **extra})
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 1


def test_builtin_scripts_that_do_not_run_are_said(a1111: TestClient) -> None:
    body = {**BASE, "alwayson_scripts": {"Soft Inpainting": {"args": [True, 1.0]}, "Hypertile": {}}}
    r = a1111.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    notes = info(r.json())["comments"]
    assert any("Soft Inpainting" in c for c in notes) and not any("Hypertile" in c for c in notes), notes
    assert a1111.get("/sdapi/v1/scripts").json() == {"txt2img": ["controlnet"], "img2img": ["controlnet"]}

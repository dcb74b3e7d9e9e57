"""The ``cache`` request field over HTTP: recorded in the PNG (and enough to reproduce the image),
bad values a 422 naming the field."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.images import read_parameters

BODY = {"class_label": 3, "steps": 6, "seed": 11, "cfg_scale": 2.0, "sampler": "dpmpp_2m"}


def test_a_cached_request_records_its_cache_and_reproduces(client: TestClient) -> None:
    r = client.post("/sample", json={**BODY, "cache": {"method": "deepcache"}})
    assert r.status_code == 200, r.text
    png = base64.b64decode(r.json()["images"][0])
    params = read_parameters(png)
    assert params["cache"] == {"method": "deepcache", "interval": 3} == r.json()["parameters"]["cache"]
    again = client.post("/sample", json={**BODY, "cache": params["cache"]}).json()
    assert again["images"] == r.json()["images"]
    plain = client.post("/sample", json=BODY).json()
    assert "cache" not in plain["parameters"] and plain["images"] != r.json()["images"]


CASES: list[tuple[Any, str, str]] = [
    ({"method": "deepcache", "interval": 0}, "interval", "greater than or equal to 1"),
    ({"method": "deepcache", "threshold": -0.1}, "threshold", "greater than or equal to 0"),
    ({"method": "deepcache", "start": -1}, "start", "greater than or equal to 0"),
    ({"method": "deepcache", "level": 13}, "level", "less than or equal to 12"),
    ({"method": "deepcache", "every": 2}, "every", "unknown field 'every'"),
    ({"interval": 2}, "method", "Field required"),
    ({"method": "teacache"}, "cache.method", "unknown cache method"),
    ({"method": "fbcache"}, "cache.method", "it runs deepcache"),
    ({"method": "deepcache", "interval": 2, "threshold": 0.1}, "cache.interval", "not both"),
    ("deepcache", "cache", "valid dictionary"),
]


@pytest.mark.parametrize(("cache", "field", "hint"), CASES)
def test_bad_cache_is_422_naming_the_field(client: TestClient, cache: Any, field: str, hint: str) -> None:
    r = client.post("/sample", json={**BODY, "cache": cache})
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert any(e["loc"][-1] == field for e in errors), errors
    assert any(hint in e["msg"] for e in errors), errors


RATE = "override_settings.deepcache_full_run_step_rate"
A1111 = {"prompt": "a 7", "steps": 4, "sampler_name": "Euler", "scheduler": "Karras", "seed": 5}


@pytest.mark.parametrize(
    ("extra", "cache"),
    [
        # the sd-webui DeepCache extension's options, as its users set them (its default rate: 5)
        (
            {"override_settings": {"deepcache_enable": True, "deepcache_full_run_step_rate": 2}},
            {
                "interval": 2,
                "start": 1,
                "level": 0,
            },  # its defaults: caching after 40 % of the 4 steps, level 0
        ),
        ({"override_settings": {"deepcache_enable": True}}, {"interval": 5, "start": 1, "level": 0}),
        (
            {"override_settings": {"deepcache_enable": True, "deepcache_cache_enable_step_percentage": 0}},
            {"interval": 5, "level": 0},
        ),
        ({"cache": {"method": "deepcache", "threshold": 0.2}}, {"threshold": 0.2}),
        ({"override_settings": {"deepcache_enable": False}}, None),
        # its current switch (since January 2024): which passes cache; it wins over the old one
        (
            {
                "override_settings": {
                    "deepcache_enable_pass": "both passes",
                    "deepcache_full_run_step_rate": 3,
                }
            },
            {"interval": 3, "start": 1, "level": 0},
        ),
        ({"override_settings": {"deepcache_enable_pass": "disable", "deepcache_enable": True}}, None),
        ({"override_settings": {"deepcache_enable_pass": "second pass"}}, None),  # no hires: no second pass
    ],
)
def test_a1111_clients_turn_it_on(client: TestClient, extra: dict, cache: dict | None) -> None:
    r = client.post("/sdapi/v1/txt2img", json={**A1111, **extra})
    assert r.status_code == 200, r.text
    params = read_parameters(base64.b64decode(r.json()["images"][0]))
    assert params.get("cache") == (None if cache is None else {"method": "deepcache", **cache})


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"override_settings": {"deepcache_enable": True, "deepcache_full_run_step_rate": 0}}, RATE),
        ({"override_settings": {"deepcache_enable": "yes"}}, "override_settings.deepcache_enable"),
        ({"cache": {"method": "fbcache"}}, "cache.method"),
        (
            {"override_settings": {"deepcache_enable_pass": "always"}},
            "override_settings.deepcache_enable_pass",
        ),
        (
            {"override_settings": {"deepcache_enable": True, "deepcache_cache_enable_step_percentage": 1.5}},
            "override_settings.deepcache_cache_enable_step_percentage",
        ),
        (  # ours caches both passes or none
            {"enable_hr": True, "override_settings": {"deepcache_enable_pass": "second pass"}},
            "override_settings.deepcache_enable_pass",
        ),
    ],
)
def test_a1111_bad_cache_is_422_naming_the_field(client: TestClient, extra: dict, field: str) -> None:
    r = client.post("/sdapi/v1/txt2img", json={**A1111, **extra})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][-1] == field

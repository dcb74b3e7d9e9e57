"""Bad input gets 422 naming the field and the allowed values."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

CASES: list[tuple[dict[str, Any], str, str]] = [
    ({"colour": "red"}, "colour", "allowed fields"),
    ({"sampler": "ddim_magic"}, "sampler", "euler"),
    ({"schedule": "zigzag"}, "schedule", "karras"),
    ({"model": "../etc/passwd"}, "model", "tiny"),
    ({"class_label": 10}, "class_label", "[0, 9]"),
    ({"sampler": "euler", "eta": 0.5}, "eta", "s_churn"),
    ({"sampler": "euler_ancestral", "eta": 50.0}, "eta", "[0.0, 10.0]"),
    ({"sampler_options": {"bogus": 1}}, "sampler_options", "allowed"),
    ({"width": 64}, "width", "must be 8"),
    ({"prompt": "a cat"}, "prompt", "class_label"),
    ({"steps": 501}, "steps", "[1, 500]"),
    ({"steps": 0}, "steps", "greater than or equal"),
    ({"n": 17}, "n", "[1, 16]"),
    ({"n": 2, "seed": [1, 2, 3]}, "seed", "n=2"),
    ({"denoise": 0.5}, "denoise", "init_image"),
    ({"init_image": "not base64!!", "denoise": 0.5}, "init_image", "base64"),
    (
        {"init_image": "aGVsbG8=", "denoise": 0.5},
        "init_image",
        "not a PNG, JPEG or WebP image (5 by",
    ),  # hello
    ({"cfg_scale": 99}, "cfg_scale", "less than or equal"),
    ({"timeout_s": 10_000}, "timeout_s", "300"),
    ({"sigmas": [1.0, 2.0, 0.0]}, "sigmas", "strictly descending"),
    ({"sigmas": [5.0, -1.0]}, "sigmas", ">= 0"),
    ({"sigmas": [1e300, 1.0]}, "sigmas", "finite (as float32)"),  # JSON allows it; float32 does not
    ({"sigmas": []}, "sigmas", "at least 1"),
    ({"sigmas": [float(600 - i) for i in range(600)]}, "sigmas", "at most 500"),
    ({"sigmas": [3.0, 1.0, 0.0], "steps": 5}, "steps", "2 steps of sigmas"),
    ({"sigmas": [3.0, 1.0], "schedule": "karras"}, "schedule", "not both"),
    ({"sigmas": [3.0, 1.0], "rho": 5.0}, "rho", "schedule 'custom'"),
    ({"sigmas": [3.0, 1.0], "denoise": 0.5}, "denoise", "omit denoise"),
    # options within their own bounds that still do not work together (checked before queueing)
    ({"sigma_min": 30.0}, "sigma_min", "must be < sigma_max"),  # the tiny model's sigma_max is 20
    ({"schedule": "karras", "rho": 0.1, "steps": 4}, "rho", "repeated or zero sigmas"),
    ({"schedule": "beta", "schedule_options": {"alpha": 0.01}, "steps": 4}, "schedule_options", "repeated"),
    ({"sampler": "dpm_fast", "steps": 1}, "steps", "steps >= 2"),
    ({"sampler": "seeds_3", "sampler_options": {"r_1": 0.9}}, "sampler_options", "r_1 < r_2"),
    ({"sampler": "dpm_adaptive", "sampler_options": {"icoeff": -1}}, "sampler_options", "[0.05, 2.0]"),
    # schedule options that fit their bounds but not the steps: the schedule's options, not the sampler
    (
        {"schedule": "linear_quadratic", "schedule_options": {"linear_steps": 10000}, "steps": 3},
        "schedule_options",
        "linear_steps must be in [1, 2]",
    ),
    (
        {"schedule": "linear_quadratic", "schedule_options": {"threshold_noise": 0.5}, "steps": 3},
        "schedule_options",
        "threshold_noise=0.5",
    ),
    # threshold_noise left at its default: blamed where it would be set
    (
        {"schedule": "linear_quadratic", "schedule_options": {"linear_steps": 1}, "steps": 100},
        "schedule_options",
        "does not descend",
    ),
    ({"schedule": "custom", "steps": 3}, "sigmas", "schedule 'custom' needs sigmas"),
]


@pytest.mark.parametrize(
    ("body", "field", "hint"), CASES, ids=[c[1] + "-" + str(i) for i, c in enumerate(CASES)]
)
def test_bad_input_is_422_naming_the_field(
    client: TestClient, body: dict[str, Any], field: str, hint: str
) -> None:
    r = client.post("/sample", json=body)
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert any(e["loc"][-1] == field or e["loc"][1] == field for e in errors), errors
    assert any(hint in e["msg"] for e in errors), errors


def test_unknown_name_lists_allowed_values(client: TestClient) -> None:
    err = client.post("/sample", json={"sampler": "nope"}).json()["detail"][0]
    assert "dpmpp_2m" in err["allowed"] and "euler" in err["allowed"]


@pytest.mark.parametrize(("option", "value"), [("linear_steps", 10000), ("threshold_noise", 0.5)])
def test_a_schedule_option_that_does_not_fit_the_steps_is_blamed_on_the_schedule_options(
    client: TestClient, option: str, value: float
) -> None:
    body = {"schedule": "linear_quadratic", "schedule_options": {option: value}, "steps": 3, "class_label": 1}
    for path in ("/sample", "/jobs"):
        err = client.post(path, json=body).json()["detail"][0]
        assert err["loc"] == ["body", "schedule_options"], err
        assert err["msg"].startswith(option) and "sampler" not in err["msg"], err


def test_unknown_schedule_lists_every_schedule_the_catalogue_does(client: TestClient) -> None:
    listed = [s["name"] for s in client.get("/schedules").json()["schedules"]]
    assert "custom" in listed and "tuned" in listed
    err = client.post("/sample", json={"schedule": "zigzag", "steps": 3}).json()["detail"][0]
    assert err["loc"] == ["body", "schedule"] and sorted(err["allowed"]) == sorted(listed), err
    assert all(name in err["msg"] for name in listed), err
    err = client.post("/sample", json={"schedule": "custom", "steps": 3}).json()["detail"][0]
    assert err["loc"] == ["body", "sigmas"] and "unknown" not in err["msg"], err


def test_jobs_endpoint_validates_the_same_way(client: TestClient) -> None:
    r = client.post("/jobs", json={"schedule": "nope"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "schedule"]


def test_unknown_job_is_404_and_ids_never_reach_paths(client: TestClient) -> None:
    assert client.get("/jobs/0123456789abcdef0123456789abcdef").status_code == 404
    assert client.get("/jobs/..%2F..%2Fetc").status_code == 404


def test_a_body_that_is_not_a_json_object_is_422_not_500(client: TestClient) -> None:
    r = client.post("/sample", content=b'{"steps": 3}', headers={"content-type": "text/plain"})
    assert r.status_code == 422 and r.json()["detail"][0]["input"] == '{"steps": 3}'  # bytes echoed as text
    r = client.post(
        "/sample", content=b"\xff\xfe binary", headers={"content-type": "application/octet-stream"}
    )
    assert r.status_code == 422, r.text
    r = client.post("/sample", json={"seed": ["x"] * 5000})
    assert r.status_code == 422 and len(r.text) < 5000  # the offending input is echoed, cut short

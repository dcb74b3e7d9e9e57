"""A tuned solver through its file and the service: `kdiff tune-schedule --sampler ipndm_tuned` writes
the sigmas, the fitted coefficients and the options they were fitted at; `/sample` with schedule
`tuned` runs them and records them; the recorded parameters posted back give the same image; a
model without the file, coefficients for another sampler, a wrong count, and coefficients or options
that contradict the file are 422s naming the field."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api.app import create_app
from service.api.settings import Settings
from service.cli import main as kdiff
from service.models.tuned import tuned_entry
from service.sampling.samplers.tuned_multistep import analytic_coefficients
from tests.support.tiny_store import make_tiny_store

BODY: dict[str, Any] = {"model": "tiny", "class_label": 2, "sampler": "ipndm_tuned", "schedule": "tuned"}


def _pixels(r: Any) -> bytes:
    """The first image's pixels (the PNG's text chunk records the request, which may differ)."""
    return Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).tobytes()


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("store")
    make_tiny_store(root, name="tiny")
    args = ["tune-schedule", "--model", "tiny", "--model-store", str(root), "--sampler", "ipndm_tuned"]
    args += ["--nfe", "4", "--calibration", "8", "--iters", "2", "--teacher-steps", "6", "--conditions"]
    args += ["--options", "max_order=3", "--reg", "0.1"]
    assert kdiff(args) == 0
    return root, json.loads((root / "tiny" / "schedules" / "ipndm_tuned-4.json").read_text())


@pytest.fixture(scope="module")
def client(tuned: tuple[Path, dict[str, Any]]) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(model_store=tuned[0], torch_threads=1, batch_wait_ms=0))) as c:
        yield c


def test_the_file_records_the_fitted_solver(tuned: tuple[Path, dict[str, Any]]) -> None:
    root, record = tuned
    c0 = analytic_coefficients(4, 3)
    assert record["steps"] == record["nfe"] == 4 and record["options"] == {"max_order": 3}
    assert len(record["coefficients"]) == len(c0) and record["coefficients"] != c0
    assert record["method"]["reg"] == 0.1 and set(record["error"]["heldout"]) >= {
        "karras",
        "schedule",
        "tuned",
    }
    entry = tuned_entry(root / "tiny", "tiny", "ipndm_tuned", 4)
    assert entry.coefficients == record["coefficients"] and list(entry.sigmas) == record["sigmas"]


def test_served_recorded_and_reproduced(client: TestClient, tuned: tuple[Path, dict[str, Any]]) -> None:
    _, record = tuned
    r = client.post("/sample", json={**BODY, "steps": 4, "seed": 5})
    assert r.status_code == 200, r.text
    params, image = r.json()["parameters"], _pixels(r)
    assert params["schedule"] == "tuned" and params["sigmas"] == record["sigmas"]
    assert params["coefficients"] == record["coefficients"] and params["sampler_options"] == {"max_order": 3}
    keys = (
        "model",
        "class_label",
        "sampler",
        "schedule",
        "sigmas",
        "steps",
        "coefficients",
        "sampler_options",
    )
    again = client.post("/sample", json={**{k: params[k] for k in keys}, "seed": params["seeds"][0]})
    assert again.status_code == 200, again.text
    assert (
        _pixels(again) == image and again.json()["images"][0] == r.json()["images"][0]
    )  # the recorded parameters posted back: the same image
    own = {**{k: params[k] for k in keys if k != "schedule"}, "seed": 5}  # no file needed
    assert _pixels(client.post("/sample", json=own)) == image
    analytic = {**own, "coefficients": analytic_coefficients(4, 3)}
    assert _pixels(client.post("/sample", json=analytic)) != image


@pytest.mark.parametrize(
    ("body", "field", "hint"),
    [
        ({**BODY, "steps": 5}, "schedule", "no tuned schedule for sampler 'ipndm_tuned' at 5 steps"),
        (
            {**BODY, "schedule": "karras", "sampler": "euler", "coefficients": [1.0]},
            "coefficients",
            "ipndm_tuned",
        ),
        ({**BODY, "schedule": "karras", "steps": 3, "coefficients": [1.0]}, "coefficients", "take 6"),
        ({**BODY, "steps": 4, "coefficients": [1.0] * 9}, "coefficients", "from the model's file"),
        ({**BODY, "steps": 4, "sampler_options": {"max_order": 2}}, "sampler_options", "max_order=3"),
        ({**BODY, "schedule": "karras", "coefficients": [1e9]}, "coefficients", "finite numbers"),
    ],
)
def test_refusals_name_the_field(client: TestClient, body: dict[str, Any], field: str, hint: str) -> None:
    r = client.post("/sample", json=body)
    assert r.status_code == 422, r.text
    assert hint in r.text and any(e["loc"][-1] == field for e in r.json()["detail"]), r.text


def test_shipped_digits_solvers_load_and_fit_their_steps() -> None:
    digits = Path(__file__).resolve().parents[2] / "model_store" / "digits"
    for nfe in (4, 5, 8):
        entry = tuned_entry(digits, "digits", "ipndm_tuned", nfe)
        order = entry.options.get("max_order", 4)
        assert entry.coefficients is not None and len(entry.sigmas) == nfe + 1 and entry.sigmas[-1] == 0.0
        assert len(entry.coefficients) == len(analytic_coefficients(nfe, order))

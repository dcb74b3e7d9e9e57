"""`kdiff tune-schedule` writes a model's tuned schedules; the service serves them as schedule `tuned`
(its file for the request's sampler and step count, a 422 listing what exists otherwise), lists them
under /models and /schedules, and records them in the PNG parameters. The shipped digits files load."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from fastapi.testclient import TestClient
from PIL import Image

from service.api.app import create_app
from service.api.settings import Settings
from service.cli import main as kdiff
from service.models.tuned import available, tuned_sigmas
from service.sampling import registry
from tests.support.tiny_store import make_tiny_store

DIGITS = Path(__file__).resolve().parents[2] / "model_store" / "digits"


def test_tune_schedule_command_then_served_listed_and_recorded(tmp_path: Path) -> None:
    make_tiny_store(tmp_path, name="tiny")
    args = ["tune-schedule", "--model", "tiny", "--model-store", str(tmp_path), "--sampler", "euler,dpmpp_2m"]
    args += ["--nfe", "3", "--calibration", "2", "--iters", "1", "--teacher-steps", "4", "--conditions"]
    assert kdiff(args) == 0
    folder = tmp_path / "tiny" / "schedules"
    record = json.loads((folder / "euler-3.json").read_text())
    assert (folder / "euler-3.png").stat().st_size > 0
    assert record["nfe"] == record["steps"] == 3 and record["calibration"]["n"] == 2
    assert set(record["error"]["calibration"]) == {"karras", "init", "tuned"}
    assert record["sigmas"][0] == 20.0 and record["sigmas"][-1] == 0.0
    with TestClient(create_app(Settings(model_store=tmp_path, torch_threads=1, batch_wait_ms=0))) as c:
        body = {
            "model": "tiny",
            "class_label": 1,
            "sampler": "euler",
            "schedule": "tuned",
            "steps": 3,
            "seed": 1,
        }
        r = c.post("/sample", json=body)
        assert r.status_code == 200, r.text
        params = r.json()["parameters"]
        assert params["schedule"] == "tuned" and params["sigmas"] == record["sigmas"]
        png = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        assert json.loads(png.text["kdiff"])["schedule"] == "tuned"  # type: ignore[attr-defined]
        for wrong in ({"steps": 4}, {"sampler": "heun"}):
            r = c.post("/sample", json={**body, **wrong})
            assert r.status_code == 422, r.text
            assert "dpmpp_2m: steps 3; euler: steps 3" in r.text
        listed = {m["name"]: m for m in c.get("/models").json()["models"]}["tiny"]["tuned_schedules"]
        assert listed == {"dpmpp_2m": [{"nfe": 3, "steps": 3}], "euler": [{"nfe": 3, "steps": 3}]}
        entry = {s["name"]: s for s in c.get("/schedules").json()["schedules"]}["tuned"]
        assert entry["models"]["tiny"] == listed


def test_tune_schedule_command_refuses_what_it_cannot_tune(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    make_tiny_store(tmp_path, name="tiny")
    base = ["tune-schedule", "--model", "tiny", "--model-store", str(tmp_path)]
    assert kdiff([*base, "--sampler", "heun", "--nfe", "4"]) == 1
    assert "allowed: 1, 3, 5" in capsys.readouterr().err
    assert kdiff([*base, "--sampler", "ddpm", "--nfe", "4"]) == 1
    assert "no deterministic mode" in capsys.readouterr().err


def test_shipped_digits_schedules_cover_the_issue_set() -> None:
    have = available(DIGITS)
    for sampler in ("dpmpp_2m", "euler", "uni_pc", "ipndm"):
        assert {r["nfe"] for r in have[sampler]} >= {5, 8, 10}, have
        for row in have[sampler]:
            s = tuned_sigmas(DIGITS, "digits", sampler, row["steps"])
            assert len(s) == row["steps"] + 1 and s[-1] == 0.0 and list(s) == sorted(s, reverse=True)
            assert registry.get_sampler(sampler).expected_nfe(row["steps"]) == row["nfe"]

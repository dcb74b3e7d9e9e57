"""A1111's discrete-timestep schedulers on a continuous-time model (frontend_schedules.py).

The oracle: a continuous-time model's timestep is log sigma, so its equivalent of a rule over T
discrete timesteps is that rule on a table spaced uniformly in log sigma, as T grows. Our real
discrete schedules (the code SD models run) on such a table of 20,000 entries must give the sigmas
the mapping runs on the continuous model, within a few table entries."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from service.api.compat import frontend_schedules
from service.images import read_parameters
from service.models.store import ModelDefaults
from service.sampling.spec import SamplingSpec, make_sigmas
from tests.support.compat import pixels

LO, HI = 0.02, 20.0  # the shipped digits model's range
T = 20_000


@dataclass
class Continuous:
    sigma_min: float = LO
    sigma_max: float = HI


class Discrete(Continuous):
    """A table uniform in log sigma from LO (t = 0) to HI (t = T-1)."""

    sigmas = torch.exp(torch.linspace(math.log(LO), math.log(HI), T, dtype=torch.float64)).float()


def model(denoiser: Any, schedule: str = "karras") -> Any:
    manifest = SimpleNamespace(name="m", model_defaults=ModelDefaults(schedule=schedule))
    return SimpleNamespace(denoiser=denoiser, manifest=manifest, name="m")


def run(schedule: str, options: dict[str, Any], steps: int, denoise: float, denoiser: Any) -> torch.Tensor:
    spec = SamplingSpec("euler", schedule, steps, [0], {}, options, denoise)
    return make_sigmas(spec, denoiser)


@pytest.mark.parametrize("schedule", ["normal", "sgm_uniform", "simple", "ddim_uniform"])
@pytest.mark.parametrize(
    ("steps", "denoise"), [(1, 1.0), (2, 1.0), (7, 1.0), (20, 1.0), (30, 1.0), (10, 0.5)]
)
def test_equivalent_is_the_discrete_rule_in_the_limit(schedule: str, steps: int, denoise: float) -> None:
    name, options, note = frontend_schedules.for_model(schedule, model(Continuous()), steps, denoise)
    assert name == "exponential" and note is not None and schedule in note
    ours = run(name, options, steps, denoise, Continuous())
    reference = run(schedule, {}, steps, denoise, Discrete())
    assert ours[-1] == 0 and reference[-1] == 0 and len(ours) == len(reference) == steps + 1
    # within n + 2 table entries (ddim's T // n drifts by up to one entry per step)
    tol = (steps / denoise + 2) * math.log(HI / LO) / (T - 1)
    assert torch.allclose(ours[:-1].log(), reference[:-1].log(), atol=tol, rtol=0), (ours, reference)


def test_a_discrete_model_runs_the_schedule_itself() -> None:
    for schedule in ("normal", "sgm_uniform", "simple", "ddim_uniform", "karras"):
        assert frontend_schedules.for_model(schedule, model(Discrete()), 20) == (schedule, {}, None)


def test_continuous_schedules_are_unchanged_on_a_continuous_model() -> None:
    for schedule in ("karras", "exponential", "beta", "kl_optimal", "align_your_steps", "polyexponential"):
        assert frontend_schedules.for_model(schedule, model(Continuous()), 20) == (schedule, {}, None)


def test_a_discrete_only_schedule_without_a_rule_falls_back_to_the_models_default() -> None:
    name, options, note = frontend_schedules.for_model("flow", model(Continuous()), 20)
    assert (name, options) == ("karras", {}) and note is not None and "default 'karras'" in note


DISCRETE_NAMES = ["normal", "Uniform", "sgm_uniform", "simple", "ddim"]  # as A1111 clients send them


@pytest.fixture(scope="module")
def client(make_client: Callable[..., TestClient]) -> Iterator[TestClient]:
    with make_client() as c:  # the tiny continuous-time UNet
        yield c


@pytest.mark.parametrize("scheduler", DISCRETE_NAMES)
def test_frontends_run_discrete_names_on_a_continuous_model_and_sample_keeps_its_422(
    client: TestClient, scheduler: str
) -> None:
    a1111 = client.post(
        "/sdapi/v1/txt2img",
        json={"prompt": "a 3", "steps": 5, "scheduler": scheduler, "width": 8, "height": 8, "seed": 1},
    )
    assert a1111.status_code == 200, a1111.text
    info = json.loads(a1111.json()["info"])
    assert any("ran as its equivalent 'exponential'" in c for c in info["comments"]), info["comments"]
    params = read_parameters(base64.b64decode(a1111.json()["images"][0]))
    assert params["schedule"] == "exponential"  # what ran, with its range: /sample reproduces it
    again = client.post(  # /sample reproduces it from the recorded schedule and range
        "/sample",
        json={
            "class_label": 3,
            "steps": 5,
            "seed": 1,
            "sampler": params["sampler"],
            "schedule": "exponential",
        }
        | {"schedule_options": params["schedule_options"], "cfg_scale": params["cfg_scale"]},
    )
    assert again.status_code == 200, again.text
    assert np.array_equal(pixels(again.json()["images"][0]), pixels(a1111.json()["images"][0]))
    openai = client.post("/v1/images/generations", json={"prompt": "a 3", "steps": 5, "schedule": scheduler})
    assert openai.status_code == 200, openai.text
    ours = client.post("/sample", json={"class_label": 3, "steps": 5, "schedule": scheduler})
    assert ours.status_code == 422 and ours.json()["detail"][0]["loc"] == ["body", "schedule"]


class Flow(Discrete):
    flow = True


def test_a_fixed_table_schedule_on_a_flow_model_falls_back_to_its_default() -> None:
    flow = model(Flow(), schedule="flow")
    name, options, note = frontend_schedules.for_model("align_your_steps", flow, 20)
    assert (name, options) == ("flow", {}) and note is not None and "'align_your_steps'" in note
    for schedule in ("normal", "karras", "beta", "flow"):  # a flow model has a table and takes ranges
        assert frontend_schedules.for_model(schedule, flow, 20) == (schedule, {}, None)


def test_every_a1111_scheduler_on_tiny_flow_models() -> None:
    """SD3 and Flux take every A1111 scheduler name (align_your_steps was a 422: its SD sigmas)."""
    pytest.importorskip("diffusers")
    from service import a1111_names
    from service.api.app import create_app
    from service.api.settings import Settings
    from tests.support.flow_tiny import tiny_flow_store

    app = create_app(Settings(model_store=tiny_flow_store(), torch_threads=1, batch_wait_ms=0))
    with TestClient(app) as c:
        for name in ("sd3", "flux_schnell"):
            for item in a1111_names.scheduler_items():
                body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "scheduler": item["name"]}
                r = c.post(
                    "/sdapi/v1/txt2img", json=body | {"override_settings": {"sd_model_checkpoint": name}}
                )
                assert r.status_code == 200, (name, item["name"], r.text[:300])

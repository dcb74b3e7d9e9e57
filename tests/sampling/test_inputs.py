"""Bad input is rejected with a message naming the field; non-finite model output names step and sigma."""

from __future__ import annotations

import math

import pytest
import torch

from service import sampling
from service.sampling import KSampler, NonFiniteError, SamplingSpec
from service.sampling.errors import InputError
from tests.support.toys import Toy


@pytest.mark.parametrize(
    ("fn", "args", "match"),
    [
        (sampling.get_sigmas_karras, (0, 0.1, 10.0), "steps"),
        (sampling.get_sigmas_karras, (10, 10.0, 0.1), "sigma_min"),
        (sampling.get_sigmas_karras, (10, 0.0, 10.0), "sigma_min"),
        (sampling.get_sigmas_karras, (10, 0.1, 10.0, -1.0), "rho"),
        (sampling.get_sigmas_exponential, (10, 0.1, math.inf), "sigma_max"),
        (sampling.get_sigmas_polyexponential, (10, 0.1, 10.0, 0.0), "rho"),
        (sampling.get_sigmas_vp, (10, -1.0), "beta_d"),
        (sampling.get_sigmas_vp, (10, 19.9, 0.1, 1.5), "eps_s"),
        (sampling.get_sigmas_linear, (2.5, 0.1, 10.0), "steps"),
        (sampling.get_sigmas_cosine, (10, 5.0, 5.0), "sigma_min"),
        (sampling.get_sigmas_custom, ([3.0, 5.0, 0.0],), "descending"),
        (sampling.get_sigmas_custom, ([3.0, -1.0],), ">= 0"),
        (sampling.get_sigmas_custom, ([],), "at least one"),
    ],
)
def test_schedule_arguments_validated(fn, args, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        fn(*args)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"linear_steps": 10000}, "linear_steps"),
        ({"threshold_noise": 0.5}, "threshold_noise"),  # with 3 steps it would not descend
        ({"threshold_noise": 1.5}, "threshold_noise"),
    ],
)
def test_schedule_option_errors_name_the_option(options: dict[str, float], field: str) -> None:
    # the API blames the field an InputError names; a plain ValueError would be blamed on the sampler
    with pytest.raises(InputError) as err:
        sampling.get_sigmas_linear_quadratic(3, 0.1, 10.0, **options)
    assert err.value.field == field and err.value.message.startswith(field)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps"),
        ({"steps": 10_001}, "steps"),
        ({"denoise": 0.0}, "denoise"),
        ({"denoise": 1.5}, "denoise"),
        ({"sampler": "euler_ancestral", "options": {"eta": -0.5}}, "eta"),
        ({"sampler": "dpmpp_2m_sde", "options": {"solver_type": "rk4"}}, "solver_type"),
        ({"sampler": "lms", "options": {"order": 2.5}}, "order"),
        ({"sampler": "euler", "options": {"s_noise": float("nan")}}, "s_noise"),
        ({"schedule": "karras", "schedule_options": {"rho": 0.0}}, "rho"),
        (
            {"schedule": "karras", "schedule_options": {"beta": 0.6}},
            "allowed options: sigma_min, sigma_max, rho",
        ),
        ({"seeds": []}, "seed"),
    ],
)
def test_spec_rejects(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingSpec(**kwargs)


def test_k_api_rejects_bad_options() -> None:
    x, sigmas = torch.randn(1, 2), sampling.get_sigmas_karras(4, 0.1, 10.0)
    with pytest.raises(ValueError, match="eta"):
        sampling.sample_euler_ancestral(Toy(), x, sigmas, eta=-1.0, disable=True)
    with pytest.raises(ValueError, match="solver_type"):
        sampling.sample_dpmpp_2m_sde(Toy(), x, sigmas, solver_type="x", disable=True)
    with pytest.raises(TypeError):
        sampling.sample_dpmpp_2m(Toy(), x, sigmas, eta=0.5, disable=True)
    with pytest.raises(ValueError, match="sigma_min"):
        sampling.sample_dpm_fast(Toy(), x, 0.0, 10.0, 5, disable=True)
    with pytest.raises(ValueError, match="order"):
        sampling.sample_dpm_adaptive(Toy(), x, 0.1, 10.0, order=4, disable=True)


def test_cfg_without_uncond_is_an_error() -> None:
    with pytest.raises(ValueError, match="uncond"):
        KSampler(Toy(), "euler").sample(
            shape=(1, 1, 2, 2), steps=2, seed=0, condition={"y": torch.zeros(1)}, cfg_scale=3.0
        )


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "dpmpp_sde", "dpm_fast"])
def test_non_finite_output_names_step_and_sigma(name: str, bad: float) -> None:
    calls = {"n": 0}

    def model(x: torch.Tensor, sigma: torch.Tensor, **kw: object) -> torch.Tensor:
        calls["n"] += 1
        out = x * 0.5
        if calls["n"] == 3:
            out[0, 0] = bad
        return out

    fn = getattr(sampling, f"sample_{name}")
    args = (0.03, 10.0, 6) if name == "dpm_fast" else (sampling.get_sigmas_karras(6, 0.03, 10.0),)
    with pytest.raises(NonFiniteError, match=r"at step \d+, sigma=[0-9.]+") as err:
        fn(model, torch.randn(2, 3) * 10, *args, disable=True)
    assert err.value.sigma > 0 and calls["n"] == 3  # stopped at the bad evaluation, not later


@pytest.mark.parametrize(
    ("kwargs", "steps", "match"),
    [
        ({"sampler": "dpm_fast"}, 1, "steps >= 2"),  # would run from sigma_max to itself: pure noise
        ({"sampler": "dpm_adaptive"}, 1, "steps >= 2"),
        ({"schedule": "karras", "schedule_options": {"rho": 0.1}}, 4, "repeated or zero sigmas"),
        ({"schedule": "polyexponential", "schedule_options": {"rho": 100.0}}, 4, "repeated or zero sigmas"),
    ],
)
def test_ksampler_refuses_degenerate_schedules(kwargs: dict, steps: int, match: str) -> None:
    ks = KSampler(
        Toy(),
        kwargs.get("sampler", "euler"),
        kwargs.get("schedule", "karras"),
        **kwargs.get("schedule_options", {}),
    )
    with pytest.raises(ValueError, match=match):
        ks.sample(shape=(1, 1, 2, 2), steps=steps, seed=0)

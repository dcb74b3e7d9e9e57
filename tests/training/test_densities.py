from __future__ import annotations

import math

import pytest
import torch

from service.training.densities import DENSITIES, make_sigma_sampler


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_log_normal_moments() -> None:
    s = make_sigma_sampler("log-normal", loc=-1.0, scale=0.5)(20000, gen())
    assert abs(s.log().mean().item() + 1.0) < 0.02 and abs(s.log().std().item() - 0.5) < 0.02


@pytest.mark.parametrize("name", ["log-uniform", "v-diffusion"])
def test_truncated_densities_stay_in_range(name: str) -> None:
    s = make_sigma_sampler(name, min_value=0.05, max_value=7.0)(5000, gen())
    assert s.min() >= 0.05 * (1 - 1e-5) and s.max() <= 7.0 * (1 + 1e-5)
    assert s.min() < 0.1 and s.max() > 5.0  # covers the range, not a point


def test_log_uniform_is_uniform_in_log() -> None:
    s = make_sigma_sampler("log-uniform", min_value=0.01, max_value=100.0)(20000, gen()).log()
    assert abs(s.mean().item() - 0.0) < 0.1  # midpoint of [log .01, log 100]


def test_log_logistic_median_and_truncation() -> None:
    s = make_sigma_sampler("log-logistic", loc=-0.5, scale=1.0)(20000, gen())
    assert abs(s.log().median().item() + 0.5) < 0.05
    t = make_sigma_sampler("log-logistic", loc=-0.5, scale=1.0, min_value=0.1, max_value=2.0)(5000, gen())
    assert t.min() >= 0.1 * (1 - 1e-5) and t.max() <= 2.0 * (1 + 1e-5)


def test_v_diffusion_is_uniform_in_angle() -> None:
    s = make_sigma_sampler("v-diffusion", sigma_data=1.0, min_value=1e-4, max_value=1e4)(20000, gen())
    t = s.atan() * 2 / math.pi
    assert abs(t.mean().item() - 0.5) < 0.01


def test_same_generator_seed_same_sigmas_and_errors() -> None:
    for name in DENSITIES:
        f = make_sigma_sampler(name)
        assert torch.equal(f(8, gen(3)), f(8, gen(3))) and (f(8, gen(3)) > 0).all()
    with pytest.raises(ValueError, match="unknown sigma density"):
        make_sigma_sampler("gaussian")
    with pytest.raises(ValueError, match="bad options"):
        make_sigma_sampler("log-normal", mean=1.0)

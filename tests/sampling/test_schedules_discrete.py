"""Schedules over a model's discrete sigma table: normal, sgm_uniform, simple, ddim_uniform."""

from __future__ import annotations

import types

import pytest
import torch

from service.sampling import registry
from service.sampling.denoisers import DiscreteEpsDenoiser
from service.sampling.ksampler import SamplingSpec, make_sigmas
from service.sampling.schedules_discrete import get_sigmas_normal

T = 1000
DISCRETE = ["normal", "sgm_uniform", "simple", "ddim_uniform"]


def _alphas() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float32) ** 2  # SD's scaled_linear
    return torch.cumprod(1 - betas, dim=0)


@pytest.fixture(scope="module")
def model() -> DiscreteEpsDenoiser:
    return DiscreteEpsDenoiser(torch.nn.Identity(), _alphas())


def test_registered_as_needing_the_discrete_table() -> None:
    flow = {"flow"}  # flow-matching models' own (service/sampling/flow.py, tests/sampling/test_flow_core.py)
    assert sorted(n for n, i in registry.SCHEDULES.items() if i.needs_discrete and n not in flow) == sorted(
        DISCRETE
    )
    for name in DISCRETE:
        info = registry.get_schedule(name)
        assert info.needs_discrete and not info.uses_range and info.describe()["needs_discrete"]


@pytest.mark.parametrize("name", DISCRETE)
@pytest.mark.parametrize("n", [1, 2, 7, 20, 1000, 1500])
def test_shape_and_order(model: DiscreteEpsDenoiser, name: str, n: int) -> None:
    spec = SamplingSpec("euler", name, n)
    raw = registry.get_schedule(name).fn(n, model)
    if n > T and not (raw[1:] < raw[:-1]).all():  # more steps than timesteps: some must repeat
        with pytest.raises(ValueError, match="repeated or zero sigmas"):
            make_sigmas(spec, model)
        return
    sig = make_sigmas(spec, model)
    assert sig.shape == (n + 1,) and sig[-1] == 0
    assert (sig[:-1] >= model.sigma_min - 1e-6).all() and (sig[:-1] <= model.sigma_max + 1e-4).all()
    assert (sig[1:] < sig[:-1]).all()


def test_normal_is_k_diffusion_get_sigmas(kd: types.SimpleNamespace, model: DiscreteEpsDenoiser) -> None:
    inner = types.SimpleNamespace(alphas_cumprod=_alphas())
    oracle = kd.external.CompVisDenoiser(inner, quantize=False)
    for n in (1, 5, 20, 33):
        torch.testing.assert_close(
            make_sigmas(SamplingSpec("euler", "normal", n), model), oracle.get_sigmas(n)
        )


def test_sgm_uniform_is_uniform_in_t(model: DiscreteEpsDenoiser) -> None:
    sig = make_sigmas(SamplingSpec("euler", "sgm_uniform", 10), model)
    t = model.sigma_to_t(sig[:-1])
    torch.testing.assert_close(t, torch.linspace(T - 1, 0, 11)[:-1], atol=2e-3, rtol=0)


@pytest.mark.parametrize("name, spacing", [("simple", "trailing"), ("ddim_uniform", "leading")])
@pytest.mark.parametrize("n", [4, 20, 50])
def test_match_diffusers_timestep_spacings(
    model: DiscreteEpsDenoiser, name: str, spacing: str, n: int
) -> None:
    diffusers = pytest.importorskip("diffusers", reason="the [sd] extra is not installed")
    sched = diffusers.EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing=spacing,
        steps_offset=1,
    )
    sched.set_timesteps(n)
    ours = make_sigmas(SamplingSpec("euler", name, n), model)
    torch.testing.assert_close(ours, sched.sigmas.float(), atol=1e-5, rtol=1e-5)


def test_needs_a_table() -> None:
    plain = types.SimpleNamespace(sigma_min=0.1, sigma_max=10.0)
    with pytest.raises(ValueError, match="discrete sigma table"):
        make_sigmas(SamplingSpec("euler", "simple", 4), plain)
    with pytest.raises(ValueError, match="steps"):
        get_sigmas_normal(0, types.SimpleNamespace(sigmas=torch.ones(3)))
    with pytest.raises(ValueError, match="unknown option"):
        SamplingSpec("euler", "normal", 4, schedule_options={"rho": 7.0})

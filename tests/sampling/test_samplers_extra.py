"""Samplers beyond k-diffusion's: order of convergence, convergence in distribution, CFG++, NFE, options.

Deterministic samplers run on the exact Gaussian-mixture denoiser against the tight ODE reference of
tests/sampling/gmm.py (Karras steps without the final 0, as in test_accuracy). Stochastic ones must
reproduce the mixture's mean and covariance from many independent runs.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor

from service import sampling
from service.sampling import KSampler, registry
from service.sampling.aliases import resolve
from service.sampling.guidance import CFGDenoiser
from service.sampling.stepper import Guided, run
from tests.support.gmm import SIGMA_MAX, SIGMA_MIN, GMMDenoiser, ode_reference

NEW = sorted(n for n, i in registry.SAMPLERS.items() if i.origin != "k-diffusion")

# (name, options, theoretical order, lower bound on the observed order from 32 to 64 steps).
# Multistep methods are limited by their low-order start and, with fixed (equal-step) coefficients
# (plms, ipndm), by the varying Karras step; the bounds say what the method guarantees there.
ORDERS: list[tuple[str, dict[str, Any], int, float]] = [
    ("ddim", {}, 1, 0.9),
    ("tcd", {"gamma": 0.0}, 1, 0.9),
    ("euler_cfg_pp", {}, 1, 0.9),
    ("euler_ancestral_cfg_pp", {"eta": 0.0}, 1, 0.9),
    ("heunpp2", {}, 1, 0.9),
    ("plms", {}, 4, 1.7),
    ("ipndm", {}, 4, 1.7),
    ("ipndm_v", {}, 4, 2.7),
    ("deis", {"max_order": 2}, 2, 1.6),
    ("deis", {}, 3, 2.3),
    ("uni_pc", {}, 3, 2.7),
    ("uni_pc_bh2", {}, 3, 2.7),
    ("uni_pc_bh2", {"order": 2}, 2, 1.7),
    ("res_multistep", {}, 2, 1.5),
    ("res_multistep_cfg_pp", {}, 2, 1.5),
    ("res_multistep_ancestral", {"eta": 0.0}, 2, 1.5),
    ("res_multistep_ancestral_cfg_pp", {"eta": 0.0}, 2, 1.5),
    ("dpmpp_2m_cfg_pp", {}, 2, 1.5),
    ("dpmpp_2s_ancestral_cfg_pp", {"eta": 0.0}, 2, 1.7),
    ("dpmpp_2m_sde_heun", {"eta": 0.0}, 2, 1.5),
    ("seeds_2", {"eta": 0.0}, 2, 1.7),
    ("seeds_3", {"eta": 0.0}, 3, 2.5),
    ("sa_solver", {"eta": 0.0}, 3, 2.7),
    ("sa_solver_pece", {"eta": 0.0}, 3, 2.7),
    ("restart", {"restart_times": 0}, 2, 1.8),
]


# Samplers without a row above are measured at their registered order (observed >= order - 0.3), so a
# new deterministic sampler is checked without editing this file. These have no ODE mode to measure
# (or a test of their own); a new stochastic sampler needs a row with its deterministic-mode options.
NO_ORDER_TEST = {
    "ddpm": "DDIM at eta 1: no deterministic mode",
    "lcm": "re-noises every step: no deterministic mode",
    "er_sde": "noise-scale function fixed: no deterministic mode",
    "gradient_estimation": "test_gradient_estimation_is_first_order",
}
AUTO: list[tuple[str, dict[str, Any], int, float]] = [
    (n, {}, registry.SAMPLERS[n].order, registry.SAMPLERS[n].order - 0.3)
    for n in NEW
    if n not in {name for name, *_ in ORDERS} and n not in NO_ORDER_TEST
]


def test_every_new_sampler_has_its_order_measured() -> None:
    for name, _, _, _ in AUTO:
        info = registry.SAMPLERS[name]
        assert not info.stochastic, f"{name} is stochastic: add a row to ORDERS with its deterministic mode"


def _error(gmm: GMMDenoiser, name: str, n: int, opts: dict[str, Any]) -> float:
    x_start, x_ref = ode_reference()
    sigmas = sampling.get_sigmas_karras(n + 1, SIGMA_MIN, SIGMA_MAX).double()[:-1]
    x = getattr(sampling, f"sample_{name}")(gmm, x_start.clone(), sigmas, disable=True, **opts)
    return float((x - x_ref).abs().max())


@pytest.mark.parametrize(
    ("name", "opts", "order", "lo"), ORDERS + AUTO, ids=[f"{n}-{o}" for n, o, _, _ in ORDERS + AUTO]
)
def test_error_falls_with_order(gmm: GMMDenoiser, name: str, opts: dict, order: int, lo: float) -> None:
    e32, e64 = _error(gmm, name, 32, opts), _error(gmm, name, 64, opts)
    observed = math.log2(e32 / e64)
    assert lo <= observed <= order + 2.7, f"{name}: observed order {observed:.2f}, theoretical {order}"
    assert e64 < {1: 0.1, 2: 1e-2}.get(order, 2e-3)


def test_gradient_estimation_is_first_order(gmm: GMMDenoiser) -> None:
    """ge_gamma = 2 extrapolates the slope; consistent (order 1), and slow to reach its asymptote."""
    e128, e256 = _error(gmm, "gradient_estimation", 128, {}), _error(gmm, "gradient_estimation", 256, {})
    assert 0.75 <= math.log2(e128 / e256) <= 1.3


@pytest.mark.parametrize("c2", [0.3, 0.5, 1.0])
def test_res_2s_is_exact_for_a_prediction_linear_in_lambda(c2: float) -> None:
    """Both order conditions hold for every h: D = a + b * lambda (lambda = -log sigma) is integrated
    exactly: x(lambda_t) = e^-H x_0 + a (1 - e^-H) + b (lambda_t - 1 + e^-H (1 - lambda_0)),
    H = lambda_t - lambda_0."""
    a, b = torch.tensor([[0.3, -1.2]], dtype=torch.float64), torch.tensor([[0.7, 0.25]], dtype=torch.float64)
    sigmas = torch.tensor([12.0, 3.0, 0.9, 0.05], dtype=torch.float64)
    x = torch.tensor([[5.0, -4.0]], dtype=torch.float64)
    out = run(
        registry.get_sampler("res_2s").stepper(x, sigmas, c2=c2), lambda x, s: a - b * s.log().view(-1, 1)
    )
    lam_0, lam_t = -math.log(12.0), -math.log(0.05)
    big_h = lam_t - lam_0
    exact = math.exp(-big_h) * x + a * -math.expm1(-big_h) + b * (lam_t - 1 + math.exp(-big_h) * (1 - lam_0))
    assert torch.allclose(out, exact, atol=1e-12, rtol=0)


def test_every_new_sampler_is_in_the_k_api() -> None:
    for name in NEW:
        fn = getattr(sampling, f"sample_{name}")
        assert fn.__doc__ and fn.__doc__ == registry.SAMPLERS[name].stepper.__doc__


# --- convergence in distribution -------------------------------------------------------------

M = 3000
# (name, options, steps): first-order ancestral samplers need ~100 steps to be unbiased to 0.1 here.
STOCHASTIC: list[tuple[str, dict[str, Any], int]] = [
    ("ddpm", {}, 96),
    ("ddim", {"eta": 1.0}, 96),
    ("euler_ancestral_cfg_pp", {}, 96),
    ("er_sde", {}, 24),
    ("seeds_2", {}, 24),
    ("seeds_3", {}, 24),
    ("sa_solver", {}, 24),
    ("sa_solver_pece", {}, 24),
    ("res_multistep_ancestral", {}, 48),
    ("dpmpp_2s_ancestral_cfg_pp", {}, 24),
    ("dpmpp_2m_sde_heun", {}, 24),
    ("restart", {"restart_times": 2}, 24),
]


def _moments(gmm: GMMDenoiser, name: str, opts: dict[str, Any], steps: int = 24) -> tuple[Tensor, Tensor]:
    torch.manual_seed(0)
    sigmas = sampling.get_sigmas_karras(steps, SIGMA_MIN, SIGMA_MAX).double()
    x = torch.randn(M, 2, dtype=torch.float64) * SIGMA_MAX
    info = registry.get_sampler(name)
    noise = None
    if info.noise == "brownian":
        noise = sampling.BrownianNoiseSampler(x, SIGMA_MIN, SIGMA_MAX, seeds=list(range(M)))
    out = run(info.stepper(x, sigmas, noise_sampler=noise, **opts), gmm)
    return out.mean(0), torch.cov(out.T)


@pytest.mark.parametrize(("name", "opts", "steps"), STOCHASTIC, ids=[n for n, _, _ in STOCHASTIC])
def test_stochastic_sampler_matches_mixture_moments(
    gmm: GMMDenoiser, name: str, opts: dict, steps: int
) -> None:
    """Mean within 0.08 and covariance within 0.12 (entrywise) of the mixture's; sampling error at
    M = 3000 is about 0.02 and 0.03, the rest is discretisation."""
    mean, cov = _moments(gmm, name, opts, steps)
    true_mean, true_cov = gmm.mean_cov()
    assert float((mean - true_mean).abs().max()) < 0.08, f"{name}: mean {mean.tolist()}"
    assert float((cov - true_cov).abs().max()) < 0.12, f"{name}: cov {cov.tolist()}"


def test_moment_check_detects_missing_noise(gmm: GMMDenoiser) -> None:
    """The same check rejects an ancestral sampler whose noise is turned down (under-dispersed)."""
    _, cov = _moments(gmm, "ddpm", {"s_noise": 0.5}, 96)
    assert float((cov - gmm.mean_cov()[1]).abs().max()) > 0.12


# --- CFG++ ---------------------------------------------------------------------------------

PLAIN = {
    "euler_cfg_pp": ("euler", {}),
    "dpmpp_2m_cfg_pp": ("dpmpp_2m", {}),
    "dpmpp_2s_ancestral_cfg_pp": ("dpmpp_2s_ancestral", {"eta": 0.0}),
    "res_multistep_cfg_pp": ("res_multistep", {}),
    "euler_ancestral_cfg_pp": ("euler_ancestral", {"eta": 0.0}),
    "res_multistep_ancestral_cfg_pp": ("res_multistep_ancestral", {"eta": 0.0}),
}


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_cfgpp_without_guidance_is_its_plain_sampler(gmm: GMMDenoiser, name: str) -> None:
    plain, opts = PLAIN[name]
    x = ode_reference()[0][:4]
    sigmas = sampling.get_sigmas_karras(8, SIGMA_MIN, SIGMA_MAX).double()
    a = run(registry.get_sampler(name).stepper(x, sigmas, **opts), lambda x, s: Guided(gmm(x, s), gmm(x, s)))
    b = run(registry.get_sampler(plain).stepper(x, sigmas, **opts), gmm)
    assert torch.allclose(a, b, atol=1e-10, rtol=0)
    assert registry.SAMPLERS[name].needs_uncond and not registry.SAMPLERS[plain].needs_uncond


def test_euler_cfgpp_renoises_along_uncond() -> None:
    """One step by hand: x1 = D_guided + (x - D_uncond) * sigma1 / sigma0 (Chung et al. 2024, DDIM form)."""
    x = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    d_g, d_u = (
        torch.tensor([[0.5, 0.1]], dtype=torch.float64),
        torch.tensor([[0.2, -0.3]], dtype=torch.float64),
    )
    sigmas = torch.tensor([2.0, 0.5], dtype=torch.float64)
    out = run(registry.get_sampler("euler_cfg_pp").stepper(x, sigmas), lambda x, s: Guided(d_g, d_u))
    assert torch.allclose(out, d_g + (x - d_u) * 0.25)


class CondToy:
    """Class-conditional toy denoiser: label shifts the prediction; class num_classes is 'null'."""

    sigma_min, sigma_max, num_classes = 0.03, 14.6, 3

    def __call__(self, x: Tensor, sigma: Tensor, class_cond: Tensor) -> Tensor:
        s = sigma.view(-1, *([1] * (x.ndim - 1)))
        return x / (1 + s**2) + (class_cond.to(x.dtype) - 1).view_as(s) * 0.5 / (1 + s)


def test_cfg_denoiser_returns_uncond_and_ksampler_uses_it() -> None:
    model = CondToy()
    x, sigma = torch.randn(2, 1, 2, 2), torch.full((2,), 3.0)
    cond, uncond = {"class_cond": torch.tensor([0, 2])}, {"class_cond": torch.tensor([3, 3])}
    out = CFGDenoiser(model, return_uncond=True)(x, sigma, cond, uncond, 2.5)
    assert isinstance(out, Guided)
    assert torch.allclose(out.uncond, model(x, sigma, **uncond))
    assert torch.allclose(out.denoised, CFGDenoiser(model)(x, sigma, cond, uncond, 2.5))
    kw = {"shape": (2, 1, 2, 2), "steps": 6, "seed": [4, 5], "condition": [0, 2], "cfg_scale": 2.0}
    a = KSampler(model, "euler_cfg_pp", "karras").sample(**kw)
    b = KSampler(model, "euler", "karras").sample(**kw)
    assert (a - b).abs().max() > 1e-3  # the uncond prediction changes the result
    c = KSampler(model, "euler_cfg_pp", "karras").sample(**{**kw, "cfg_scale": 1.0})
    d = KSampler(model, "euler", "karras").sample(**{**kw, "cfg_scale": 1.0})
    assert torch.allclose(c, d, atol=1e-6)


# --- metadata, NFE, options, names -----------------------------------------------------------


class Counter:
    sigma_min, sigma_max = 0.03, 14.6

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: Tensor, sigma: Tensor, **kw: Any) -> Tensor:
        self.calls += 1
        return x / (1 + sigma.view(-1, 1, 1, 1) ** 2)


NFE_CASES = [(n, {}) for n in NEW] + [("restart", {"restart_times": 1, "restart_steps": 5})]


@pytest.mark.parametrize(("name", "opts"), NFE_CASES, ids=[f"{n}-{o}" for n, o in NFE_CASES])
def test_expected_nfe_is_exact(name: str, opts: dict) -> None:
    for steps in (1, 6):
        model = Counter()
        KSampler(model, name, "karras", **opts).sample(shape=(1, 1, 2, 2), steps=steps, seed=1)
        assert model.calls == registry.SAMPLERS[name].expected_nfe(steps, opts), f"{name} at {steps} steps"


BAD = [
    ("uni_pc", {"order": 4}),
    ("deis", {"max_order": 0}),
    ("ipndm", {"max_order": 5}),
    ("tcd", {"gamma": 1.5}),
    ("ddim", {"eta": -0.1}),
    ("seeds_2", {"r": 1.0}),
    ("sa_solver", {"predictor_order": 5}),
    ("restart", {"restart_steps": 1}),
    ("er_sde", {"max_stage": 4}),
    ("gradient_estimation", {"ge_gamma": float("nan")}),
]


@pytest.mark.parametrize(("name", "opts"), BAD, ids=[n for n, _ in BAD])
def test_bad_options_rejected(name: str, opts: dict) -> None:
    key = next(iter(opts))
    with pytest.raises(ValueError, match=key):
        KSampler(Counter(), name, **opts)
    with pytest.raises(ValueError, match=key):  # and by the stepper itself (k-diffusion style calls)
        getattr(sampling, f"sample_{name}")(
            Counter(), torch.zeros(1, 1, 2, 2), torch.tensor([1.0, 0.0]), **opts
        )


def test_seeds_3_needs_ordered_stages() -> None:
    with pytest.raises(ValueError, match="r_1"):
        KSampler(Counter(), "seeds_3", r_1=0.7, r_2=0.5).sample(shape=(1, 1, 2, 2), steps=2, seed=0)


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [
        ("DPM++ 2M Karras", ("dpmpp_2m", "karras")),
        ("Euler a", ("euler_ancestral", None)),
        ("DPM++ 2M SDE Heun Exponential", ("dpmpp_2m_sde_heun", "exponential")),
        ("dpmpp_2m_k", ("dpmpp_2m", "karras")),
        ("DDIM CFG++", ("euler_cfg_pp", None)),
        ("UniPC", ("uni_pc", None)),
        ("UniPCMultistepScheduler", ("uni_pc_bh2", None)),
        ("PLMS", ("plms", None)),
        ("res_multistep_ancestral_cfg_pp", ("res_multistep_ancestral_cfg_pp", None)),
    ],
)
def test_aliases(spelling: str, expected: tuple[str, str | None]) -> None:
    assert resolve(spelling) == expected


def test_every_registered_name_resolves_to_itself_and_ksampler_takes_aliases() -> None:
    assert all(resolve(n) == (n, None) for n in registry.SAMPLERS)
    ks = KSampler(Counter(), "DPM++ 2M SDE Karras", schedule="Align Your Steps")
    assert (ks.sampler, ks.schedule) == ("dpmpp_2m_sde", "karras")
    assert KSampler(Counter(), "Euler a", schedule="KL Optimal").schedule == "kl_optimal"
    with pytest.raises(registry.UnknownNameError, match="uni_pc"):
        KSampler(Counter(), "DPM++ 9M")

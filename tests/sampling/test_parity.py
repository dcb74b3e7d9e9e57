"""Parity with k-diffusion 0.1.1.post1: same model, same noise -> same result (float64, <= 1e-6)."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

from service import sampling
from tests.support.toys import toy_image_model

TOL = 1e-6
SDE = {"dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"}
CASES: list[tuple[str, dict[str, Any]]] = [
    ("euler", {}),
    ("euler", {"s_churn": 1.0}),
    ("euler", {"s_churn": 0.5, "s_noise": 1.003}),
    ("euler_ancestral", {}),
    ("euler_ancestral", {"eta": 0.5, "s_noise": 0.9}),
    ("heun", {}),
    ("heun", {"s_churn": 0.7}),
    ("dpm_2", {}),
    ("dpm_2", {"s_churn": 0.7}),
    ("dpm_2_ancestral", {}),
    ("dpm_2_ancestral", {"eta": 0.0}),
    ("lms", {}),
    ("lms", {"order": 2}),
    ("dpmpp_2s_ancestral", {}),
    ("dpmpp_2s_ancestral", {"eta": 0.0}),
    ("dpmpp_sde", {}),
    ("dpmpp_sde", {"r": 0.3, "eta": 0.5}),
    ("dpmpp_sde", {"eta": 0.0}),
    ("dpmpp_2m", {}),
    ("dpmpp_2m_sde", {}),
    ("dpmpp_2m_sde", {"solver_type": "heun"}),
    ("dpmpp_2m_sde", {"eta": 0.0}),
    ("dpmpp_3m_sde", {}),
    ("dpmpp_3m_sde", {"eta": 0.5, "s_noise": 1.1}),
]


@pytest.fixture(params=["gmm", "image"])
def problem(request: pytest.FixtureRequest, gmm: Any) -> tuple[Any, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    if request.param == "gmm":
        return gmm, torch.randn(4, 2, generator=g, dtype=torch.float64)
    return toy_image_model, torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)


def _run_both(kd: Any, name: str, model: Any, x: torch.Tensor, sigmas: torch.Tensor, **opts: Any) -> tuple:
    ours, theirs = getattr(sampling, f"sample_{name}"), getattr(kd.sampling, f"sample_{name}")
    logs: tuple[list, list] = ([], [])
    results = []
    for fn, log in ((theirs, logs[0]), (ours, logs[1])):
        kw = dict(opts)
        if name in SDE:  # identical noise: k-diffusion's own Brownian tree, same seeds
            positive = sigmas[sigmas > 0]
            kw["noise_sampler"] = kd.sampling.BrownianTreeNoiseSampler(
                x, positive.min(), sigmas.max(), seed=list(range(10, 10 + x.shape[0]))
            )
        torch.manual_seed(3)  # identical global-RNG noise for ancestral / churn samplers
        results.append(fn(model, x * sigmas[0], sigmas, callback=log.append, disable=True, **kw))
    return results[0], results[1], logs


@pytest.mark.parametrize("schedule", ["karras", "exponential"])
@pytest.mark.parametrize(("name", "opts"), CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_sampler_matches_k_diffusion(kd: Any, problem: tuple, name: str, opts: dict, schedule: str) -> None:
    model, x = problem
    sigmas = getattr(kd.sampling, f"get_sigmas_{schedule}")(7, 0.03, 14.6).double()
    theirs, ours, (log_theirs, log_ours) = _run_both(kd, name, model, x, sigmas, **opts)
    assert torch.isfinite(ours).all()
    assert (ours - theirs).abs().max().item() <= TOL
    assert len(log_ours) == len(log_theirs) == len(sigmas) - 1
    for a, b in zip(log_theirs, log_ours, strict=True):
        assert set(a) == set(b)
        for key in ("x", "denoised", "sigma", "sigma_hat"):
            assert (torch.as_tensor(a[key]) - torch.as_tensor(b[key])).abs().max().item() <= TOL


@pytest.mark.parametrize("name", ["euler", "heun", "dpm_2", "lms", "dpmpp_2m", "dpmpp_2s_ancestral"])
def test_tail_without_zero_matches(kd: Any, gmm: Any, name: str) -> None:
    """img2img-style tails (no final 0) behave as in k-diffusion for fixed-step samplers."""
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sigmas = kd.sampling.get_sigmas_karras(9, 0.05, 10.0).double()[3:-1]
    theirs, ours, _ = _run_both(kd, name, gmm, x, sigmas)
    assert (ours - theirs).abs().max().item() <= TOL


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 10, 11])
@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_dpm_fast_matches(kd: Any, gmm: Any, n: int, eta: float) -> None:
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 14.0
    out = []
    for fn in (kd.sampling.sample_dpm_fast, sampling.sample_dpm_fast):
        torch.manual_seed(5)
        out.append(fn(gmm, x, 0.03, 14.0, n, disable=True, eta=eta))
    assert (out[0] - out[1]).abs().max().item() <= TOL


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"order": 2},
        {"rtol": 0.01, "atol": 0.001},
        {"pcoeff": 0.2, "icoeff": 0.6, "dcoeff": 0.1},
        {"eta": 0.8},
    ],
)
def test_dpm_adaptive_matches(kd: Any, gmm: Any, opts: dict) -> None:
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 14.0
    out = []
    for fn in (kd.sampling.sample_dpm_adaptive, sampling.sample_dpm_adaptive):
        torch.manual_seed(5)
        out.append(fn(gmm, x, 0.03, 14.0, disable=True, return_info=True, **opts))
    (a, info_a), (b, info_b) = out
    assert info_a == info_b and info_b["nfe"] > 0
    assert (a - b).abs().max().item() <= TOL


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("karras", (10, 0.0292, 14.6146)),
        ("karras", (1, 0.1, 10.0, 3.0)),
        ("karras", (25, 0.002, 80.0, 9.0)),
        ("exponential", (10, 0.0292, 14.6146)),
        ("exponential", (1, 0.1, 10.0)),
        ("polyexponential", (10, 0.0292, 14.6146)),
        ("polyexponential", (12, 0.01, 50.0, 2.5)),
        ("vp", (10,)),
        ("vp", (7, 10.0, 0.2, 1e-2)),
    ],
)
def test_schedules_match(kd: Any, name: str, args: tuple) -> None:
    theirs = getattr(kd.sampling, f"get_sigmas_{name}")(*args)
    ours = getattr(sampling, f"get_sigmas_{name}")(*args)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= TOL


def test_helpers_match(kd: Any) -> None:
    x, d = torch.randn(3, 2, 2, dtype=torch.float64), torch.randn(3, 2, 2, dtype=torch.float64)
    sigma = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    assert torch.equal(sampling.to_d(x, sigma, d), kd.sampling.to_d(x, sigma, d))
    assert torch.equal(sampling.append_zero(sigma), kd.sampling.append_zero(sigma))
    for eta in (0.0, 0.5, 1.0):
        a = kd.sampling.get_ancestral_step(torch.tensor(3.0), torch.tensor(1.2), eta)
        b = sampling.get_ancestral_step(torch.tensor(3.0), torch.tensor(1.2), eta)
        assert all(abs(float(p) - float(q)) <= 1e-7 for p, q in zip(a, b, strict=True))


# k-diffusion 0.1.1's samplers: the registry marks them with origin "k-diffusion".
K_DIFFUSION = sorted(f"sample_{n}" for n, i in sampling.SAMPLERS.items() if i.origin == "k-diffusion")


def test_the_k_diffusion_samplers_are_its_13(kd: Any) -> None:
    assert K_DIFFUSION == sorted(n for n in dir(kd.sampling) if n.startswith("sample_"))


@pytest.mark.parametrize("name", K_DIFFUSION)
def test_signatures_match(kd: Any, name: str) -> None:
    """Same parameter names and defaults as k-diffusion (ours may add options at the end)."""
    theirs = inspect.signature(getattr(kd.sampling, name)).parameters
    ours = inspect.signature(getattr(sampling, name)).parameters
    for pname, p in theirs.items():
        assert pname in ours, f"{name} lacks {pname}"
        assert ours[pname].default == p.default, f"{name}.{pname} default differs"
    assert list(ours)[: len(theirs)][:3] == list(theirs)[:3]

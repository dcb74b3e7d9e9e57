"""The flow-matching core (service/sampling/flow.py, samplers/flow_forms.py) on an exact
rectified-flow Gaussian mixture: x_t = (1 - t) x0 + t eps with x0 ~ the mixture of gmm.py.

Its exact x0 prediction is the VE mixture denoiser at (x / (1 - t), t / (1 - t)) (the prior mean
at t = 1); the network this test wraps returns the velocity (x - D) / t, as SD3 and Flux do.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from service import sampling
from service.sampling import registry
from service.sampling.driver import Driver, drive
from service.sampling.flow import FlowDenoiser, FlowSpec, flow_spec, flux_shift, get_sigmas_flow, shift_time
from service.sampling.samplers.flow_forms import is_ode
from service.sampling.spec import SamplingSpec, make_sigmas, start_latents
from tests.support.gmm import DIM, GMMDenoiser

SHIFT, U_END = 3.0, 0.02
T_END = float(shift_time(U_END, SHIFT))


class FlowGMM:
    """Exact D(x; t) of the flow mixture; ``velocity`` is what a flow network returns."""

    def __init__(self) -> None:
        self.ve = GMMDenoiser()
        self.mean = self.ve.mean_cov()[0]

    def denoise(self, x: Tensor, t: Tensor) -> Tensor:
        t64 = t.double().reshape(-1)
        inside = (t64 < 1).reshape(-1, *([1] * (x.ndim - 1)))
        tc = t64.clamp(max=0.5 if bool((t64 >= 1).all()) else 1 - 1e-12).clamp(max=1 - 1e-12)
        d = self.ve(x.double() / (1 - tc).reshape(-1, *([1] * (x.ndim - 1))), tc / (1 - tc))
        return torch.where(inside, d, self.mean.reshape(1, -1).expand_as(d)).to(x.dtype)

    def velocity(self, x: Tensor, t: Tensor, **_: Any) -> Tensor:
        tt = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return (x - self.denoise(x, t)) / tt


@pytest.fixture(scope="module")
def flow_gmm() -> FlowGMM:
    return FlowGMM()


def model(gmm: FlowGMM, shift: float = SHIFT) -> FlowDenoiser:
    return FlowDenoiser(gmm.velocity, shift=shift)


def start() -> Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(16, DIM, generator=g, dtype=torch.float64)


@cache
def reference() -> np.ndarray:
    """The flow ODE dx/dt = v from t = 1 to T_END (scipy DOP853, rtol 1e-12)."""
    from scipy.integrate import solve_ivp

    gmm, x0 = FlowGMM(), start()

    def f(t: float, y: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(y.reshape(x0.shape))
        return gmm.velocity(x, torch.full((x.shape[0],), t, dtype=torch.float64)).numpy().ravel()

    sol = solve_ivp(f, (1.0, T_END), x0.numpy().ravel(), method="DOP853", rtol=1e-12, atol=1e-12)
    assert sol.success
    return sol.y[:, -1].reshape(x0.shape)


def schedule(n: int) -> Tensor:
    u = torch.linspace(1.0, U_END, n + 1, dtype=torch.float64)
    return shift_time(u, SHIFT)  # type: ignore[return-value]


def error(gmm: FlowGMM, name: str, n: int, opts: dict[str, Any]) -> float:
    spec = FlowSpec(name, "karras", n, [0] * 16, dict(opts))
    st = spec.info.stepper(start(), schedule(n), **spec.options)
    x = sampling.run(st, model(gmm))
    return float((x - torch.from_numpy(reference())).abs().max())


ODE = sorted(
    n for n, i in registry.SAMPLERS.items() if is_ode(i, {}) and n not in {"dpm_adaptive", "dpm_fast"}
)
NOISY_ODE_MODE = [
    ("euler_ancestral", {"eta": 0.0}, 1),
    ("dpm_2_ancestral", {"eta": 0.0}, 2),
    ("dpmpp_2s_ancestral", {"eta": 0.0}, 2),
    ("dpmpp_sde", {"eta": 0.0}, 2),
    ("dpmpp_2m_sde", {"eta": 0.0}, 2),
    ("euler_cfg_pp", {}, 1),
    ("dpmpp_2m_cfg_pp", {}, 2),
]
# Multistep methods are limited by their low-order start (as in test_samplers_extra); ge_gamma = 2
# extrapolates the slope and is slow to reach its asymptote.
LOW = {"gradient_estimation": 0.7, "ipndm": 2.7, "plms": 2.7, "uni_pc_bh2": 2.3}


@pytest.mark.parametrize("name", ODE)
def test_ode_samplers_keep_their_order_on_the_flow_ode(flow_gmm: FlowGMM, name: str) -> None:
    order = sampling.get_sampler(name).order
    e32, e64 = error(flow_gmm, name, 32, {}), error(flow_gmm, name, 64, {})
    observed = math.log2(e32 / e64)
    assert observed >= LOW.get(name, order - 0.3), f"{name}: observed {observed:.2f}, order {order}"
    assert e64 < {1: 0.1, 2: 1e-2}.get(order, 1.2e-2)


@pytest.mark.parametrize(("name", "opts", "order"), NOISY_ODE_MODE)
def test_flow_forms_in_their_ode_mode_solve_the_flow_ode(
    flow_gmm: FlowGMM, name: str, opts: dict, order: int
) -> None:
    """The VE-coordinate forms (started at t = 1 - 1e-4) keep their order too."""
    e32, e64 = error(flow_gmm, name, 32, opts), error(flow_gmm, name, 64, opts)
    assert e64 < {1: 0.1, 2: 1e-2}[order]
    assert math.log2(e32 / e64) >= order - 0.4


def test_euler_is_the_flow_euler_step(flow_gmm: FlowGMM) -> None:
    """x' = x + v (t' - t): what diffusers' FlowMatchEulerDiscreteScheduler does."""
    sig = schedule(8).float()
    x0 = start().float()
    x = x0.clone()
    for i in range(8):
        t = sig[i].expand(16)
        x = x + flow_gmm.velocity(x, t) * (sig[i + 1] - sig[i])
    ours = sampling.sample_euler(model(flow_gmm), x0.clone(), sig, disable=True)
    assert (ours - x).abs().max() < 1e-5


# ~100 steps: first-order ones (as on the VE mixture), and those whose first step (Heun from
# sigma_ve ~ 1e4) is too coarse below that.
SLOW = {
    "ddpm",
    "ddim",
    "euler_ancestral",
    "euler_ancestral_cfg_pp",
    "tcd",
    "euler",
    "restart",
    "dpm_2_ancestral",
}
STOCHASTIC = sorted(
    n for n, i in registry.SAMPLERS.items() if not is_ode(i, {}) and not i.batch_coupled and i.noise != "none"
)
STOCHASTIC = [n for n in STOCHASTIC if n not in {"lcm", "tcd"}]  # consistency samplers: for distilled models
CASES = [(n, {}) for n in STOCHASTIC] + [("euler", {"s_churn": 20.0}), ("ddim", {"eta": 1.0})]


@pytest.mark.parametrize(("name", "opts"), CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_flow_forms_converge_in_distribution(flow_gmm: FlowGMM, name: str, opts: dict) -> None:
    """2000 samples from t = 1 to 0 (karras over the shifted range): the data's mean and covariance."""
    n, steps = 2000, 96 if name in SLOW else 32
    den = model(flow_gmm)
    spec = SamplingSpec(name, "karras", steps, list(range(n)), opts)
    sig = make_sigmas(spec, den).double()
    x = start_latents(spec, (n, DIM), sig, "cpu", torch.float64)
    out = drive(Driver(flow_spec(spec), sig, x), den)
    mean, cov = flow_gmm.ve.mean_cov()
    assert (out.mean(0) - mean).abs().max() < 0.08, name
    assert (torch.cov(out.T) - cov).abs().max() < 0.12, name


def _run(spec: SamplingSpec, den: FlowDenoiser, init: Tensor | None) -> Tensor:
    sig = make_sigmas(spec, den)
    x = start_latents(spec, (len(spec.seeds), DIM), sig, "cpu", torch.float32, init)
    fspec, sig, x = den.prepare(spec, x, sig, init)
    return drive(Driver(fspec, sig, x, init=init), den)


@pytest.mark.parametrize("name", sorted(registry.SAMPLERS))
def test_batch_invariance(flow_gmm: FlowGMM, name: str) -> None:
    den = model(flow_gmm)
    both = _run(SamplingSpec(name, "flow", 6, [5, 9]), den, None)
    alone = _run(SamplingSpec(name, "flow", 6, [9]), den, None)
    assert (both[1:] - alone).abs().max() <= 1e-5, name


def test_img2img_start_is_the_flow_interpolation(flow_gmm: FlowGMM) -> None:
    den = model(flow_gmm)
    spec = SamplingSpec("euler", "flow", 5, [3], denoise=0.5)
    sig = make_sigmas(spec, den)
    init = torch.full((1, DIM), 0.7)
    noise = start_latents(spec, (1, DIM), sig, "cpu", torch.float32) / sig[0]
    x = start_latents(spec, (1, DIM), sig, "cpu", torch.float32, init)
    _, _, x = den.prepare(spec, x, sig, init)
    assert torch.allclose(x, (1 - sig[0]) * init + sig[0] * noise, atol=1e-6)
    assert 0 < float(sig[0]) < 1


def test_schedules_match_diffusers() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    for n in (1, 4, 28):
        sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
        sch.set_timesteps(n)
        ours = get_sigmas_flow(n, FlowDenoiser(lambda x, t: x, shift=3.0))
        assert torch.allclose(ours, sch.sigmas, atol=1e-6), n
        mu = math.log(flux_shift(1024))
        fx = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
        fx.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n).tolist(), mu=mu)
        ours = get_sigmas_flow(n, FlowDenoiser(lambda x, t: x, shift=flux_shift(1024), ramp_end=None))
        assert torch.allclose(ours, fx.sigmas, atol=1e-6), n


def test_range_and_table_schedules_are_shifted() -> None:
    den = FlowDenoiser(lambda x, t: x, shift=3.0)
    assert den.sigma_max == 1.0 and abs(den.sigma_min - 3 * 1e-3 / (1 + 2e-3)) < 1e-7
    for name in ("karras", "beta", "simple", "normal", "sgm_uniform", "exponential"):
        spec = SamplingSpec("euler", name, 10, [0])
        s = make_sigmas(spec, den)
        assert 0.95 < float(s[0]) <= 1.0 + 1e-6 and float(s[-2]) > 0 and s[-1] == 0, name


def test_sigmas_above_one_are_refused(flow_gmm: FlowGMM) -> None:
    from service.sampling.errors import InputError

    den = model(flow_gmm)
    spec = SamplingSpec("euler", "karras", 4, [0], schedule_options={"sigma_max": 5.0})
    sig = make_sigmas(spec, den)
    with pytest.raises(InputError) as info:
        den.prepare(spec, torch.zeros(1, DIM), sig, None)
    assert info.value.field == "sigma_max"

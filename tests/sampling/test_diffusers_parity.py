"""Differential tests: our steppers against diffusers' schedulers on the same discrete eps model and noise.

The model is a small random-weight eps network over Stable Diffusion's DDPM beta table. diffusers
works on x_vp = x / sqrt(1 + sigma^2) (DDIM, DDPM, PNDM, LCM, TCD, UniPC, DEIS, SA-Solver) or on
x itself (Heun, KDPM2, Euler ancestral); the same start and the same global-RNG noise draws go to
both, and the results must agree within 1e-4 (max abs over images of unit scale).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from service.sampling import registry
from service.sampling.denoisers import DiscreteEpsDenoiser
from service.sampling.stepper import run

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is the [sd] extra; the test command installs it"
)

TOL = 1e-4
B, D = 4, 6
BETAS = {
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "num_train_timesteps": 1000,
}


class EpsNet:
    """A smooth nonlinear eps(x_vp, t) with fixed random weights; t may be fractional."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(7)
        self.w = torch.randn(D, D, generator=g, dtype=torch.float64) / math.sqrt(D)
        self.b = torch.randn(D, generator=g, dtype=torch.float64)

    def __call__(self, x: Tensor, t: Tensor, **kw: Any) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1).expand(x.shape[0], 1)
        return torch.tanh(x.double() @ self.w + self.b * (t / 1000 - 0.5)) + 0.3 * x.double()


EPS = EpsNet()


def _alphas_cumprod() -> Tensor:
    return diffusers.DDIMScheduler(**BETAS).alphas_cumprod.double()


def _denoiser(quantize: bool) -> DiscreteEpsDenoiser:
    return DiscreteEpsDenoiser(EPS, _alphas_cumprod(), quantize=quantize)


def _sigma_of_t(t: Tensor | int) -> float:
    ac = _alphas_cumprod()[int(t)]
    return float(((1 - ac) / ac) ** 0.5)


def _start() -> Tensor:
    return torch.randn(B, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _run_diffusers(sched: Any, x: Tensor, seed: int = 0, **step_kw: Any) -> Tensor:
    torch.manual_seed(seed)
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t)
        x = sched.step(EPS(inp, t), t, x, **step_kw).prev_sample
    return x.double()


def _run_ours(
    name: str, sigmas: list[float], x_ve: Tensor, quantize: bool, seed: int = 0, **opts: Any
) -> Tensor:
    torch.manual_seed(seed)
    stepper = registry.get_sampler(name).stepper(x_ve, torch.tensor(sigmas, dtype=torch.float64), **opts)
    return run(stepper, _denoiser(quantize))


def _vp_case(name: str, sched: Any, steps: int, final: float = 0.0, seed: int = 0, **opts: Any) -> float:
    """Run a VP-form diffusers scheduler and our sampler on sigmas at its timesteps (+ final sigma)."""
    sched.set_timesteps(steps)
    sigmas = [_sigma_of_t(t) for t in sched.timesteps] + [final]
    x_vp = _start()
    theirs = _run_diffusers(sched, x_vp.clone(), seed)
    ours = _run_ours(name, sigmas, x_vp * math.sqrt(1 + sigmas[0] ** 2), True, seed, **opts)
    return float((ours / math.sqrt(1 + final**2) - theirs).abs().max())


def test_ddim_eta0_and_eta() -> None:
    kw = {**BETAS, "clip_sample": False, "set_alpha_to_one": True, "steps_offset": 1}
    assert _vp_case("ddim", diffusers.DDIMScheduler(**kw), 10) < TOL
    sched = diffusers.DDIMScheduler(**kw)
    sched.set_timesteps(10)
    sigmas = [_sigma_of_t(t) for t in sched.timesteps] + [0.0]
    x_vp = _start()
    theirs = _run_diffusers(sched, x_vp.clone(), 5, eta=0.6)
    ours = _run_ours("ddim", sigmas, x_vp * math.sqrt(1 + sigmas[0] ** 2), True, 5, eta=0.6)
    assert float((ours - theirs).abs().max()) < TOL


def test_ddpm() -> None:
    sched = diffusers.DDPMScheduler(**BETAS, clip_sample=False, variance_type="fixed_small")
    assert _vp_case("ddpm", sched, 10, seed=11) < TOL


def test_pndm_plms() -> None:
    sched = diffusers.PNDMScheduler(**BETAS, skip_prk_steps=True, set_alpha_to_one=True, steps_offset=1)
    sched.set_timesteps(10)
    ts = list(dict.fromkeys(int(t) for t in sched.timesteps))  # the repeated second timestep once
    sigmas = [_sigma_of_t(t) for t in ts] + [0.0]
    x_vp = _start()
    theirs = _run_diffusers(sched, x_vp.clone())
    ours = _run_ours("plms", sigmas, x_vp * math.sqrt(1 + sigmas[0] ** 2), True)
    assert float((ours - theirs).abs().max()) < TOL


def _lcm_denoiser() -> Callable[..., Tensor]:
    """LCM's boundary condition (c_skip, c_out at timestep * 10, sigma_data 0.5) is part of the model."""
    base = _denoiser(True)

    def model(x: Tensor, sigma: Tensor, **kw: Any) -> Tensor:
        t = base.sigma_to_t(sigma).double() * 10
        c_skip, c_out = 0.25 / (t**2 + 0.25), t / (t**2 + 0.25) ** 0.5
        x_vp = x / (1 + sigma.double() ** 2).sqrt()[:, None]
        return c_out[:, None] * base(x, sigma) + c_skip[:, None] * x_vp

    return model


def test_lcm() -> None:
    sched = diffusers.LCMScheduler(**BETAS, set_alpha_to_one=True)
    sched.set_timesteps(4)
    sigmas = [_sigma_of_t(t) for t in sched.timesteps] + [0.0]
    x_vp = _start()
    theirs = _run_diffusers(sched, x_vp.clone(), 9)
    torch.manual_seed(9)
    stepper = registry.get_sampler("lcm").stepper(x_vp * math.sqrt(1 + sigmas[0] ** 2), torch.tensor(sigmas))
    ours = run(stepper, _lcm_denoiser())
    assert float((ours - theirs).abs().max()) < TOL


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.7])
def test_tcd(gamma: float) -> None:
    sched = diffusers.TCDScheduler(**BETAS, set_alpha_to_one=True)
    sched.set_timesteps(4)
    sigmas = [_sigma_of_t(t) for t in sched.timesteps] + [0.0]
    x_vp = _start()
    theirs = _run_diffusers(sched, x_vp.clone(), 4, eta=gamma)
    table = _denoiser(True).sigmas
    ours = _run_ours(
        "tcd", sigmas, x_vp * math.sqrt(1 + sigmas[0] ** 2), True, 4, gamma=gamma, sigma_table=table
    )
    sigma_end = float(table[0])  # TCD's last step stops at timestep 0
    assert float((ours / math.sqrt(1 + sigma_end**2) - theirs).abs().max()) < TOL


def _sigma_case(
    name: str, sched: Any, steps: int, quantize: bool = True, seed: int = 0, **opts: Any
) -> float:
    """A scheduler that lists its own sigmas (multistep VP ones: compare in x_vp; Euler-type: in x)."""
    sched.set_timesteps(steps)
    sigmas = sched.sigmas.double().tolist()
    vp = not hasattr(sched, "init_noise_sigma") or float(sched.init_noise_sigma) == 1.0
    x = _start()
    theirs = _run_diffusers(sched, x.clone(), seed)
    ours = _run_ours(name, sigmas, x * (math.sqrt(1 + sigmas[0] ** 2) if vp else 1.0), quantize, seed, **opts)
    end = sigmas[-1]
    return float((ours / (math.sqrt(1 + end**2) if vp else 1.0) - theirs).abs().max())


@pytest.mark.parametrize(("variant", "order"), [("bh1", 2), ("bh2", 2), ("bh1", 3), ("bh2", 3)])
def test_unipc(variant: str, order: int) -> None:
    # diffusers' bh1 gives NaN on a final sigma of 0 (B(h) = -inf times 0), so bh1 ends at sigma_min there.
    final = "sigma_min" if variant == "bh1" else "zero"
    sched = diffusers.UniPCMultistepScheduler(
        **BETAS, solver_order=order, solver_type=variant, final_sigmas_type=final
    )
    name = "uni_pc" if variant == "bh1" else "uni_pc_bh2"
    assert _sigma_case(name, sched, 10, order=order) < TOL


@pytest.mark.parametrize(("order", "steps"), [(2, 10), (3, 10), (3, 16)])
def test_deis(order: int, steps: int) -> None:
    sched = diffusers.DEISMultistepScheduler(**BETAS, solver_order=order)
    assert _sigma_case("deis", sched, steps, max_order=order) < TOL


@pytest.mark.parametrize(("p", "c", "stochastic"), [(2, 2, False), (3, 4, False), (2, 2, True), (3, 3, True)])
def test_sa_solver(p: int, c: int, stochastic: bool) -> None:
    tau: Callable[[Any], float] = (
        (lambda t: 1.0 if 200 <= t <= 800 else 0.0) if stochastic else (lambda t: 0.0)
    )
    sched = diffusers.SASolverScheduler(**BETAS, predictor_order=p, corrector_order=c, tau_func=tau)
    table = _denoiser(True).sigmas
    window = {  # tau = 1 for timesteps 200..800: sigma bounds between table entries
        "tau_sigma_lo": float((table[199] * table[200]).sqrt()),
        "tau_sigma_hi": float((table[800] * table[801]).sqrt()),
    }
    opts = {"predictor_order": p, "corrector_order": c, "eta": 1.0 if stochastic else 0.0, **window}
    assert _sigma_case("sa_solver", sched, 12, seed=21, **opts) < TOL


def test_sa_solver_default_noise_window_is_diffusers_default() -> None:
    """Without window options our SA-Solver adds noise where diffusers' default tau_func does (t 200..800)."""
    sched = diffusers.SASolverScheduler(**BETAS, predictor_order=3, corrector_order=4)
    assert _sigma_case("sa_solver", sched, 12, seed=21, predictor_order=3, corrector_order=4) < TOL


def _unique_sigmas(sched: Any) -> list[float]:
    """Heun/KDPM2 list each inner sigma twice (one per stage); ours once, then 0."""
    return [v for v in dict.fromkeys(sched.sigmas.double().tolist()) if v > 0] + [0.0]


def test_heun() -> None:
    sched = diffusers.HeunDiscreteScheduler(**BETAS)
    sched.set_timesteps(8)
    sigmas = _unique_sigmas(sched)
    x = _start() * float(sched.init_noise_sigma)
    theirs = _run_diffusers(sched, x.clone())
    assert float((_run_ours("heun", sigmas, x, False) - theirs).abs().max()) < TOL


def test_kdpm2() -> None:
    sched = diffusers.KDPM2DiscreteScheduler(**BETAS)
    sched.set_timesteps(8)
    sigmas = _unique_sigmas(sched)
    x = _start() * float(sched.init_noise_sigma)
    theirs = _run_diffusers(sched, x.clone())
    assert float((_run_ours("dpm_2", sigmas, x, False) - theirs).abs().max()) < TOL


def test_euler_ancestral() -> None:
    sched = diffusers.EulerAncestralDiscreteScheduler(**BETAS)
    sched.set_timesteps(10)
    sigmas = sched.sigmas.double().tolist()
    x = _start() * float(sched.init_noise_sigma)
    theirs = _run_diffusers(sched, x.clone(), 17)
    assert float((_run_ours("euler_ancestral", sigmas, x, False, 17) - theirs).abs().max()) < TOL

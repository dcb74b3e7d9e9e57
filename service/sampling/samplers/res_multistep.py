"""RES multistep (Zhang et al. 2023, https://arxiv.org/abs/2308.02157): a 2nd-order exponential
multistep integrator on the data prediction, with ancestral noise and CFG++ variants.

CFG++ (Chung et al. 2024, https://arxiv.org/abs/2406.08070) re-noises along the *unconditional*
noise estimate; see :mod:`.cfg_pp`.
"""

from __future__ import annotations

import math

from torch import Tensor

from ..catalog import ANCESTRAL, sampler
from ..noise import NoiseSampler
from ..stepper import Callback, GuidedStepper
from .common import ancestral_noise, ancestral_step, evaluate_guided, noise_at


def _res_multistep(
    x: Tensor,
    sigmas: Tensor,
    callback: Callback | None,
    noise_sampler: NoiseSampler | None,
    eta: float,
    s_noise: float,
    cfg_pp: bool,
) -> GuidedStepper:
    noise_sampler = ancestral_noise(x, noise_sampler, eta, s_noise)
    s = sigmas.tolist()
    old_denoised: Tensor | None = None
    old_sigma_down = s[0]
    for i in range(len(s) - 1):
        denoised, uncond = yield from evaluate_guided(x, sigmas, s, i, callback)
        sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
        if cfg_pp:
            x = x + (denoised - uncond)  # re-noise along the unconditional direction
        if sigma_down == 0 or old_denoised is None:
            x = denoised + (x - denoised) * (sigma_down / s[i])
        else:  # 2nd-order exponential integrator: D linear in lambda through the previous point
            h = math.log(s[i] / sigma_down)
            # The previous evaluation's position in units of h (< 0), measured along the deterministic
            # part of the last step (sigma_{i-1} -> its sigma_down): that ignores the injected noise,
            # which is what keeps the ancestral variant unbiased at few steps (ComfyUI's choice too).
            c2 = math.log(old_sigma_down / s[i - 1]) / h
            phi1 = -math.expm1(-h) / h
            phi2 = (1 - phi1) / h
            b1, b2 = phi1 - phi2 / c2, phi2 / c2
            x = x * (sigma_down / s[i]) + (denoised * b1 + old_denoised * b2) * h
        if s[i + 1] > 0 and sigma_up > 0:
            x = x + noise_at(noise_sampler, sigmas, s[i], s[i + 1]) * (s_noise * sigma_up)
        old_denoised, old_sigma_down = denoised, sigma_down
    return x


@sampler(order=2, aliases=("RES multistep",), origin="RES (Zhang et al. 2023)")
def res_multistep(
    x: Tensor, sigmas: Tensor, *, callback: Callback | None = None, noise_sampler: NoiseSampler | None = None
) -> GuidedStepper:
    """RES multistep, Zhang et al. (2023), https://arxiv.org/abs/2308.02157: 2nd-order exponential."""
    return (yield from _res_multistep(x, sigmas, callback, noise_sampler, 0.0, 1.0, False))


@sampler(order=2, noise="gaussian", stochastic=True, options=ANCESTRAL, origin="RES (Zhang et al. 2023)")
def res_multistep_ancestral(
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> GuidedStepper:
    """RES multistep with ancestral noise (ComfyUI), after Zhang et al. (2023), https://arxiv.org/abs/2308.02157."""
    return (yield from _res_multistep(x, sigmas, callback, noise_sampler, eta, s_noise, False))


@sampler(order=2, aliases=("RES multistep CFG++",), needs_uncond=True, origin="CFG++ (Chung et al. 2024)")
def res_multistep_cfg_pp(
    x: Tensor, sigmas: Tensor, *, callback: Callback | None = None, noise_sampler: NoiseSampler | None = None
) -> GuidedStepper:
    """RES multistep with CFG++ re-noising (Chung et al. 2024, https://arxiv.org/abs/2406.08070)."""
    return (yield from _res_multistep(x, sigmas, callback, noise_sampler, 0.0, 1.0, True))


@sampler(
    order=2,
    noise="gaussian",
    stochastic=True,
    options=ANCESTRAL,
    needs_uncond=True,
    origin="CFG++ (Chung et al. 2024)",
)
def res_multistep_ancestral_cfg_pp(
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> GuidedStepper:
    """Ancestral RES multistep with CFG++ re-noising (Chung et al. 2024, https://arxiv.org/abs/2406.08070)."""
    return (yield from _res_multistep(x, sigmas, callback, noise_sampler, eta, s_noise, True))

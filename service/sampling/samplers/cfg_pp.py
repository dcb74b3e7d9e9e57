"""CFG++ samplers (Chung et al. 2024, https://arxiv.org/abs/2406.08070): Euler, ancestral Euler,
DPM-Solver++(2M) and (2S) ancestral that step to the guided x0 prediction but re-noise along the
*unconditional* noise estimate (x - uncond) / sigma.

These steppers are sent a :class:`~service.sampling.stepper.Guided` (guided, uncond) by drivers that
know the sampler ``needs_uncond``; a plain tensor means uncond = guided, which makes each one its
ordinary counterpart.
"""

from __future__ import annotations

import math

from torch import Tensor

from ..catalog import sampler
from ..stepper import Eval, GuidedStepper, StepIO
from .common import StepResult, ancestral, evaluate_guided, split_guided


@sampler(
    order=1, aliases=("DDIM CFG++", "Euler CFG++"), needs_uncond=True, origin="CFG++ (Chung et al. 2024)"
)
def euler_cfg_pp(x: Tensor, sigmas: Tensor, io: StepIO) -> GuidedStepper:
    """Euler with CFG++, Chung et al. (2024), https://arxiv.org/abs/2406.08070 (A1111's "DDIM CFG++")."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised, uncond = yield from evaluate_guided(x, sigmas, s, i, io.callback)
        x = denoised + (x - uncond) * (s[i + 1] / s[i])
    return x


@sampler(order=1, aliases=("Euler a CFG++",), origin="CFG++ (Chung et al. 2024)")
@ancestral(guided=True)
def euler_ancestral_cfg_pp(
    x: Tensor, denoised: Tensor, uncond: Tensor, sigma_down: float, s: list[float], sigmas: Tensor, i: int
) -> StepResult:
    """Ancestral Euler with CFG++, Chung et al. (2024), https://arxiv.org/abs/2406.08070."""
    return denoised + (x - uncond) * (sigma_down / s[i])


@sampler(order=2, aliases=("DPM++ 2M CFG++",), needs_uncond=True, origin="CFG++ (Chung et al. 2024)")
def dpmpp_2m_cfg_pp(x: Tensor, sigmas: Tensor, io: StepIO) -> GuidedStepper:
    """DPM-Solver++(2M) with CFG++ re-noising (Chung et al. 2024, https://arxiv.org/abs/2406.08070)."""
    s = sigmas.tolist()
    old_denoised: Tensor | None = None
    for i in range(len(s) - 1):
        denoised, uncond = yield from evaluate_guided(x, sigmas, s, i, io.callback)
        ratio = s[i + 1] / s[i]
        x = denoised + (x - uncond) * ratio
        if old_denoised is not None and s[i + 1] > 0:
            r = math.log(s[i - 1] / s[i]) / math.log(s[i] / s[i + 1])
            x = x + (denoised - old_denoised) * ((1 - ratio) / (2 * r))
        old_denoised = denoised
    return x


@sampler(order=2, nfe_per_step=2, aliases=("DPM++ 2S a CFG++",), origin="CFG++ (Chung et al. 2024)")
@ancestral(guided=True)
def dpmpp_2s_ancestral_cfg_pp(
    x: Tensor, denoised: Tensor, uncond: Tensor, sigma_down: float, s: list[float], sigmas: Tensor, i: int
) -> StepResult:
    """Ancestral DPM-Solver++(2S) with CFG++ re-noising (Chung et al. 2024, https://arxiv.org/abs/2406.08070)."""
    if sigma_down == 0:
        return denoised
    sigma_s = math.sqrt(s[i] * sigma_down)  # midpoint in lambda
    x_2 = denoised + (x - uncond) * (sigma_s / s[i])
    denoised_2, _ = split_guided((yield Eval(x_2, sigmas.new_tensor(sigma_s), i)))
    return denoised_2 + (x + denoised - uncond - denoised_2) * (sigma_down / s[i])

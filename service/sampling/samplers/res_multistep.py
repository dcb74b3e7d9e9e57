"""RES multistep (Zhang et al. 2023, https://arxiv.org/abs/2308.02157): a 2nd-order exponential
multistep integrator on the data prediction, with ancestral noise and CFG++ variants.

CFG++ (Chung et al. 2024, https://arxiv.org/abs/2406.08070) re-noises along the *unconditional*
noise estimate; see :mod:`.cfg_pp`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import Tensor

from ..catalog import F, sampler
from ..stepper import GuidedStepper, StepIO
from .common import ancestral_evaluate_guided, ancestral_noise, renoise


def _cfg_pp(name: str, what: str, fixed: dict[str, Any], aliases: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Register ``what`` with CFG++ re-noising (``cfg_pp`` fixed on) as the variant ``name``."""
    return sampler(
        name=name,
        fixed={**fixed, "cfg_pp": True},
        doc=f"{what} with CFG++ re-noising (Chung et al. 2024, https://arxiv.org/abs/2406.08070).",
        aliases=aliases,
        needs_uncond=True,
        origin="CFG++ (Chung et al. 2024)",
    )


@_cfg_pp("res_multistep_ancestral_cfg_pp", "Ancestral RES multistep", {})
@_cfg_pp("res_multistep_cfg_pp", "RES multistep", {"eta": 0.0, "s_noise": 1.0}, ("RES multistep CFG++",))
@sampler(
    name="res_multistep",
    fixed={"eta": 0.0, "s_noise": 1.0, "cfg_pp": False},
    doc="RES multistep, Zhang et al. (2023), https://arxiv.org/abs/2308.02157: 2nd-order exponential.",
    aliases=("RES multistep",),
)
@sampler(
    order=2,
    noise="gaussian",
    stochastic=True,
    internal=("cfg_pp",),
    origin="RES (Zhang et al. 2023)",
)
def res_multistep_ancestral(
    x: Tensor, sigmas: Tensor, io: StepIO, *, eta: float = 1.0, s_noise: float = 1.0, cfg_pp: bool = False
) -> GuidedStepper:
    """RES multistep with ancestral noise (ComfyUI), after Zhang et al. (2023), https://arxiv.org/abs/2308.02157.

    ``cfg_pp``: re-noise along the unconditional prediction (CFG++; registered as the ``*_cfg_pp``
    samplers, which the driver sends :class:`~service.sampling.stepper.Guided`).
    """
    noise_sampler = ancestral_noise(x, io.noise_sampler, eta, s_noise)
    s = sigmas.tolist()
    old_denoised: Tensor | None = None
    old_sigma_down = s[0]
    for i in range(len(s) - 1):
        denoised, uncond, sigma_down, sigma_up = yield from ancestral_evaluate_guided(
            x, sigmas, s, i, io.callback, eta
        )
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
        if sigma_up > 0:
            x = renoise(x, noise_sampler, sigmas, s, i, s_noise * sigma_up)
        old_denoised, old_sigma_down = denoised, sigma_down
    return x

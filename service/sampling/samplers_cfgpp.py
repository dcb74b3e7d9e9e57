"""RES multistep and the CFG++ samplers (see docs/SAMPLERS.md).

CFG++ (Chung et al. 2024, https://arxiv.org/abs/2406.08070) steps to the guided x0 prediction but
re-noises along the *unconditional* noise estimate (x - uncond) / sigma. These steppers are sent a
:class:`~.stepper.Guided` (guided, uncond) by drivers that know the sampler ``needs_uncond``; a plain
tensor means uncond = guided, which makes each one its ordinary counterpart.
"""

from __future__ import annotations

import math

from torch import Tensor

from .noise import NoiseSampler, default_noise_sampler
from .samplers import _check_nonneg, _noise, _report, ancestral_step
from .stepper import Callback, Eval, Guided, GuidedStepper


def split_guided(out: Tensor | Guided) -> tuple[Tensor, Tensor]:
    """(guided, uncond) from what a driver sent; a plain tensor serves as both."""
    return (out.denoised, out.uncond) if isinstance(out, Guided) else (out, out)


def _res_multistep(
    x: Tensor,
    sigmas: Tensor,
    callback: Callback | None,
    noise_sampler: NoiseSampler | None,
    eta: float,
    s_noise: float,
    cfg_pp: bool,
) -> GuidedStepper:
    _check_nonneg(eta=eta, s_noise=s_noise)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s = sigmas.tolist()
    old_denoised: Tensor | None = None
    old_sigma_down = s[0]
    for i in range(len(s) - 1):
        denoised, uncond = split_guided((yield Eval(x, sigmas[i], i)))
        _report(callback, x, i, sigmas, s[i], denoised)
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
            x = x + _noise(noise_sampler, sigmas, s[i], s[i + 1]) * (s_noise * sigma_up)
        old_denoised, old_sigma_down = denoised, sigma_down
    return x


def res_multistep(
    x: Tensor, sigmas: Tensor, *, callback: Callback | None = None, noise_sampler: NoiseSampler | None = None
) -> GuidedStepper:
    """RES multistep, Zhang et al. (2023), https://arxiv.org/abs/2308.02157: 2nd-order exponential."""
    return (yield from _res_multistep(x, sigmas, callback, noise_sampler, 0.0, 1.0, False))


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


def res_multistep_cfg_pp(
    x: Tensor, sigmas: Tensor, *, callback: Callback | None = None, noise_sampler: NoiseSampler | None = None
) -> GuidedStepper:
    """RES multistep with CFG++ re-noising (Chung et al. 2024, https://arxiv.org/abs/2406.08070)."""
    return (yield from _res_multistep(x, sigmas, callback, noise_sampler, 0.0, 1.0, True))


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


def euler_cfg_pp(
    x: Tensor, sigmas: Tensor, *, callback: Callback | None = None, noise_sampler: NoiseSampler | None = None
) -> GuidedStepper:
    """Euler with CFG++, Chung et al. (2024), https://arxiv.org/abs/2406.08070 (A1111's "DDIM CFG++")."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised, uncond = split_guided((yield Eval(x, sigmas[i], i)))
        _report(callback, x, i, sigmas, s[i], denoised)
        x = denoised + (x - uncond) * (s[i + 1] / s[i])
    return x


def euler_ancestral_cfg_pp(
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> GuidedStepper:
    """Ancestral Euler with CFG++, Chung et al. (2024), https://arxiv.org/abs/2406.08070."""
    _check_nonneg(eta=eta, s_noise=s_noise)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised, uncond = split_guided((yield Eval(x, sigmas[i], i)))
        _report(callback, x, i, sigmas, s[i], denoised)
        sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
        x = denoised + (x - uncond) * (sigma_down / s[i])
        if s[i + 1] > 0 and sigma_up > 0:
            x = x + _noise(noise_sampler, sigmas, s[i], s[i + 1]) * (s_noise * sigma_up)
    return x


def dpmpp_2m_cfg_pp(
    x: Tensor, sigmas: Tensor, *, callback: Callback | None = None, noise_sampler: NoiseSampler | None = None
) -> GuidedStepper:
    """DPM-Solver++(2M) with CFG++ re-noising (Chung et al. 2024, https://arxiv.org/abs/2406.08070)."""
    s = sigmas.tolist()
    old_denoised: Tensor | None = None
    for i in range(len(s) - 1):
        denoised, uncond = split_guided((yield Eval(x, sigmas[i], i)))
        _report(callback, x, i, sigmas, s[i], denoised)
        ratio = s[i + 1] / s[i]
        x = denoised + (x - uncond) * ratio
        if old_denoised is not None and s[i + 1] > 0:
            r = math.log(s[i - 1] / s[i]) / math.log(s[i] / s[i + 1])
            x = x + (denoised - old_denoised) * ((1 - ratio) / (2 * r))
        old_denoised = denoised
    return x


def dpmpp_2s_ancestral_cfg_pp(
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> GuidedStepper:
    """Ancestral DPM-Solver++(2S) with CFG++ re-noising (Chung et al. 2024, https://arxiv.org/abs/2406.08070)."""
    _check_nonneg(eta=eta, s_noise=s_noise)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised, uncond = split_guided((yield Eval(x, sigmas[i], i)))
        _report(callback, x, i, sigmas, s[i], denoised)
        sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
        if sigma_down == 0:
            x = denoised
        else:
            sigma_s = math.sqrt(s[i] * sigma_down)  # midpoint in lambda
            x_2 = denoised + (x - uncond) * (sigma_s / s[i])
            denoised_2, _ = split_guided((yield Eval(x_2, sigmas.new_tensor(sigma_s), i)))
            x = denoised_2 + (x + denoised - uncond - denoised_2) * (sigma_down / s[i])
        if s[i + 1] > 0 and sigma_up > 0:
            x = x + _noise(noise_sampler, sigmas, s[i], s[i + 1]) * (s_noise * sigma_up)
    return x

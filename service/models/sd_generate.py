"""Direct (engine-free) Stable Diffusion sampling: txt2img, img2img and inpainting in one call.

The engine runs the same pieces batched across jobs; this driver is for the CLI, scripts and
tests. Guidance combines the cond and uncond rows of one model call; ordinary UNets inpaint
by blending each denoised prediction with the init latents outside the mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from service.sampling.guidance import cat_cond, cfg_combine
from service.sampling.ksampler import SamplingSpec, make_sigmas, make_steppers, start_latents
from service.sampling.stepper import Guided, run

from .stable_diffusion import SDJobInputs, StableDiffusion


class _Guided:
    """(x, sigma) -> guided denoised for one slice of images, with the inpainting blend."""

    def __init__(self, sd: StableDiffusion, inp: SDJobInputs, part: slice, scale: float, cfgpp: bool) -> None:
        self.denoiser, self.scale, self.cfgpp = sd.denoiser, scale, cfgpp
        self.cond = {k: v[part] for k, v in inp.cond.items()}
        self.uncond = None if inp.uncond is None else {k: v[part] for k, v in inp.uncond.items()}
        self.init = None if inp.init is None else inp.init[part]
        self.mask = inp.mask

    def _blend(self, out: Tensor) -> Tensor:
        if self.mask is None or self.init is None:
            return out
        return out * self.mask + self.init * (1 - self.mask)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor | Guided:
        if self.uncond is None:
            return self._blend(self.denoiser(x, sigma, **self.cond))
        both = self.denoiser(
            torch.cat([x, x]), torch.cat([sigma, sigma]), **cat_cond([self.cond, self.uncond])
        )
        cond_out, uncond_out = both.chunk(2)
        guided = self._blend(cfg_combine(cond_out, uncond_out, self.scale))
        return Guided(guided, self._blend(uncond_out)) if self.cfgpp else guided


@torch.inference_mode()
def generate(
    sd: StableDiffusion,
    prompt: str,
    negative_prompt: str | None = None,
    *,
    seeds: Sequence[int] = (0,),
    sampler: str = "dpmpp_2m",
    schedule: str = "karras",
    steps: int = 20,
    cfg_scale: float = 7.0,
    width: int | None = None,
    height: int | None = None,
    init_image: Tensor | None = None,
    mask: Tensor | None = None,
    denoise: float = 1.0,
    sampler_options: dict[str, Any] | None = None,
    schedule_options: dict[str, Any] | None = None,
    sigmas: Tensor | None = None,
    x_start: Tensor | None = None,
    output: str = "images",
) -> Tensor:
    """Images in [-1, 1] (``output="latents"``: the final latents).

    ``sigmas`` overrides the schedule; ``x_start`` overrides the seeded start (already scaled).
    """
    seeds = list(seeds)
    n = len(seeds)
    inp = sd.job_inputs(
        prompt,
        negative_prompt,
        n=n,
        cfg_scale=cfg_scale,
        width=width,
        height=height,
        init_image=init_image,
        mask=mask,
    )
    spec = SamplingSpec(
        sampler, schedule, steps, seeds, dict(sampler_options or {}), dict(schedule_options or {}), denoise
    )
    if sigmas is None:
        sigmas = make_sigmas(spec, sd.denoiser, sd.device)
    sigmas = sigmas.to(sd.device, torch.float32)
    if x_start is None:
        x = start_latents(spec, (n, *inp.latent_shape), sigmas, sd.device, torch.float32, inp.init)
    else:
        x = x_start.to(sd.device, torch.float32)
    out = torch.empty_like(x)
    cfgpp = spec.info.needs_uncond
    for part, stepper in make_steppers(spec, x, sigmas):
        out[part] = run(stepper, _Guided(sd, inp, part, cfg_scale, cfgpp))
    if output == "latents":
        return out
    return sd.decode(out)

"""Direct (engine-free) Stable Diffusion sampling: txt2img, img2img and inpainting in one call.

The engine runs the same :class:`~service.sampling.driver.Driver` batched across jobs; this loop
is for the CLI, scripts and tests (guidance rows and the inpainting blend are the driver's).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from service.sampling.driver import Driver, drive
from service.sampling.spec import SamplingSpec, make_sigmas

from .stable_diffusion import StableDiffusion


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
    if x_start is None:
        driver = Driver.start(
            spec,
            sd.denoiser,
            (n, *inp.latent_shape),
            cond=inp.cond,
            uncond=inp.uncond,
            cfg_scale=cfg_scale,
            init=inp.init,
            mask=inp.mask,
            device=sd.device,
            sigmas=sigmas,
        )
    else:  # the caller's own start, already scaled
        if sigmas is None:
            sigmas = make_sigmas(spec, sd.denoiser, sd.device)
        x = x_start.to(sd.device, torch.float32)
        sigmas = sigmas.to(sd.device, torch.float32)
        driver = Driver(spec, sigmas, x, inp.cond, inp.uncond, cfg_scale, inp.init, inp.mask)
    out = drive(driver, sd.denoiser)
    if output == "latents":
        return out
    return sd.decode(out)

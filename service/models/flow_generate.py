"""Direct (engine-free) SD3 / Flux sampling: txt2img, img2img and inpainting in one call.

The engine runs the same :class:`~service.sampling.driver.Driver`; this is the loop for the CLI,
scripts and tests. The flow model's denoiser prepares the spec, sigmas and start
(:meth:`~service.sampling.flow.FlowDenoiser.prepare`), as drivers started by the engine do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from service.sampling.driver import Driver, drive
from service.sampling.spec import SamplingSpec

from .flow_model import FlowModel


@torch.inference_mode()
def generate(
    m: FlowModel,
    prompt: str,
    negative_prompt: str | None = None,
    *,
    seeds: Sequence[int] = (0,),
    sampler: str = "euler",
    schedule: str = "flow",
    steps: int = 20,
    cfg_scale: float | None = None,
    guidance: float | None = None,
    width: int | None = None,
    height: int | None = None,
    init_image: Tensor | None = None,
    mask: Tensor | None = None,
    denoise: float = 1.0,
    sampler_options: dict[str, Any] | None = None,
    schedule_options: dict[str, Any] | None = None,
    output: str = "images",
) -> Tensor:
    """Images in [-1, 1] (``output="latents"``: the final latents). ``cfg_scale`` defaults to
    7 for SD3 and 1 (none) for Flux."""
    seeds = list(seeds)
    n = len(seeds)
    cfg = (7.0 if m.uses_cfg else 1.0) if cfg_scale is None else cfg_scale
    inp = m.job_inputs(
        prompt,
        negative_prompt,
        n=n,
        cfg_scale=cfg,
        width=width,
        height=height,
        init_image=init_image,
        mask=mask,
        guidance=guidance,
    )
    spec = SamplingSpec(
        sampler, schedule, steps, seeds, dict(sampler_options or {}), dict(schedule_options or {}), denoise
    )
    driver = Driver.start(  # for a flow model this runs the denoiser's prepare() (flow forms, shift)
        spec,
        m.denoiser,
        (n, *inp.latent_shape),
        cond=inp.cond,
        uncond=inp.uncond,
        cfg_scale=cfg,
        init=inp.init,
        mask=inp.mask,
        device=m.device,
    )
    out = drive(driver, m.denoiser)
    return out if output == "latents" else m.decode(out)

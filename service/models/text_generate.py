"""Direct (engine-free) text-to-image sampling: txt2img, img2img and inpainting in one call, for
Stable Diffusion and the flow-matching models (SD3, Flux).

The engine runs the same :class:`~service.sampling.driver.Driver` batched across jobs; this loop
is for the CLI, scripts and tests (guidance rows and the inpainting blend are the driver's). A flow
model's denoiser prepares the spec, sigmas and start
(:meth:`~service.sampling.flow.FlowDenoiser.prepare`) in ``Driver.start``, as for drivers the
engine starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from service.sampling.driver import Driver, drive
from service.sampling.spec import SamplingSpec, make_sigmas

from .text_image import TextImageModel, TextInputs

if TYPE_CHECKING:
    from typing_extensions import Unpack


@torch.inference_mode()
def generate(
    m: TextImageModel,
    prompt: str,
    negative_prompt: str | None = None,
    *,
    seeds: Sequence[int] = (0,),
    sampler: str | None = None,
    schedule: str | None = None,
    steps: int = 20,
    cfg_scale: float | None = None,
    denoise: float = 1.0,
    sampler_options: dict[str, Any] | None = None,
    schedule_options: dict[str, Any] | None = None,
    sigmas: Tensor | None = None,
    x_start: Tensor | None = None,
    output: str = "images",
    **inputs: Unpack[TextInputs],
) -> Tensor:
    """Images in [-1, 1] (``output="latents"``: the final latents).

    ``sampler``, ``schedule`` and ``cfg_scale`` default to the model's (Stable Diffusion: dpmpp_2m,
    karras, 7; SD3: euler, flow, 7; Flux: euler, flow, 1 (no CFG)). ``inputs``: width, height,
    init_image, mask, clip_skip and (Flux-dev) guidance, as ``job_inputs`` takes them. ``sigmas``
    overrides the schedule; ``x_start`` (Stable Diffusion only) overrides the seeded start (already
    scaled).
    """
    seeds = list(seeds)
    n = len(seeds)
    cfg = m.default_cfg if cfg_scale is None else cfg_scale
    inp = m.job_inputs(prompt, negative_prompt, n=n, cfg_scale=cfg, **inputs)
    spec = SamplingSpec(
        sampler or m.default_sampler,
        schedule or m.default_schedule,
        steps,
        seeds,
        dict(sampler_options or {}),
        dict(schedule_options or {}),
        denoise,
    )
    if x_start is None:  # for a flow model this runs the denoiser's prepare() (flow forms, shift)
        driver = Driver.start(
            spec,
            m.denoiser,
            (n, *inp.latent_shape),
            cond=inp.cond,
            uncond=inp.uncond,
            cfg_scale=cfg,
            init=inp.init,
            mask=inp.mask,
            device=m.device,
            sigmas=sigmas,
        )
    else:  # the caller's own start, already scaled
        if getattr(m.denoiser, "flow", False):
            raise ValueError("x_start is for Stable Diffusion (a flow model prepares its own start)")
        if sigmas is None:
            sigmas = make_sigmas(spec, m.denoiser, m.device)
        x = x_start.to(m.device, torch.float32)
        sigmas = sigmas.to(m.device, torch.float32)
        driver = Driver(spec, sigmas, x, inp.cond, inp.uncond, cfg, inp.init, inp.mask)
    m.bind_driver(driver)
    out = drive(driver, m.denoiser)
    return out if output == "latents" else m.decode(out)

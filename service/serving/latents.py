"""Sampling that starts from latents and hands its latents on (ComfyUI's LATENT, service/comfy).

A request with a :class:`LatentInput` runs through the engine like any other (it batches with all
traffic); what differs is where its driver starts and what part of the schedule it runs:

- ``samples``: the start latents [n, C, h, w] in the model's own latent space (a previous run's
  result, or those resized by LatentUpscale), in place of an encoded ``init_image``; img2img's rule
  applies (``x = samples + noise * sigma_0``, flow models ``(1 - t0) samples + t0 noise``);
- ``add_noise`` False: no noise is added (ComfyUI's KSamplerAdvanced ``add_noise: disable``), so a
  run can continue from latents that still hold their noise;
- ``start_step`` / ``end_step`` / ``leftover_noise``: the window of the schedule
  (:class:`service.sampling.spec.StepWindow`);
- ``noise_mask``: ComfyUI's noise mask (any size, 1 = sample, 0 = keep ``samples``), resized to the
  latents (bilinear, rounded) as ComfyUI's ``prepare_mask`` does.

The job's driver keeps its final latents (``Driver.result()``) until the caller lets the driver go:
the ComfyUI executor takes ``job.request.driver`` when it submits and reads them when the job ends.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from service.sampling.errors import InputError
from service.sampling.spec import SamplingSpec, StepWindow

if TYPE_CHECKING:
    from service.models.store import LoadedModel


@dataclass(frozen=True, eq=False)
class LatentInput:
    """Where a request's sampling starts and which steps it runs (see the module doc)."""

    samples: Tensor | None = None  # [n, C, h, w]; None: from noise (an empty latent)
    add_noise: bool = True
    start_step: int = 0
    end_step: int | None = None
    leftover_noise: bool = False
    noise_mask: Tensor | None = None  # [n or 1, H, W] in [0, 1]


def with_window(spec: SamplingSpec, latent: LatentInput | None) -> SamplingSpec:
    """The spec running the latent's window of its schedule."""
    if latent is None or (latent.start_step == 0 and latent.end_step is None):
        return spec
    if latent.end_step is not None and latent.end_step <= latent.start_step:
        raise InputError("end_step", f"end_step must be after start_step ({latent.start_step})")
    window = StepWindow(latent.start_step, latent.end_step, latent.leftover_noise)
    return dataclasses.replace(spec, window=window)


def check(request: Any, latent: LatentInput) -> None:
    """Latents to start from exclude the fields that also say where sampling starts (an init image
    goes with a window or no added noise: VAEEncode's pixels, encoded by the model)."""
    names = ("init_image", "mask", "hires") if latent.samples is not None else ("hires",)
    for name in names:
        if getattr(request, name) is not None:
            raise InputError(name, f"{name} cannot be combined with a latent start")


def start(latent: LatentInput, inputs: Any, model: LoadedModel, n: int) -> None:
    """Put the latent's samples (and noise mask) into the model family's ``inputs`` as the start."""
    shape = tuple(inputs.latent_shape or model.latent_shape)
    if latent.samples is None:
        if latent.noise_mask is not None:
            raise InputError("noise_mask", "a noise mask needs latents to keep (VAEEncode or a sampler's)")
        return
    got = tuple(latent.samples.shape)
    if got != (n, *shape):
        raise InputError(
            "latent",
            f"the latents have shape {list(got)}; model {model.name!r} samples {[n, *shape]} at this size",
        )
    inputs.init = latent.samples.to(model.device)
    if latent.noise_mask is not None:
        m = latent.noise_mask.reshape(-1, 1, *latent.noise_mask.shape[-2:]).float()
        m = F.interpolate(m, size=shape[-2:], mode="bilinear").round()
        inputs.mask = m.to(model.device)


def start_noise(latent: LatentInput | None, shape: tuple[int, ...]) -> Tensor | None:
    """The unit start noise: zeros when the latent asks for none, else None (the seeds')."""
    if latent is None or latent.add_noise:
        return None
    return torch.zeros(shape)

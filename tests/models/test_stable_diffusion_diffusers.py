"""Differential tests against diffusers' own pipelines on the same tiny models and initial noise.

Our euler / dpmpp_2m steppers, driven over the discrete eps or v denoiser with the diffusers
scheduler's sigmas, must reproduce EulerDiscreteScheduler's and DPMSolverMultistepScheduler's
final latents (two prompts, negative prompts and CFG in one call). Noise conventions differ:
Euler (trailing spacing) starts at noise * sigma_max like k-diffusion; DPMSolverMultistep works
in VP space, whose start noise is x_VE = noise * sqrt(sigma_max^2 + 1).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")

from diffusers import (  # noqa: E402
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)

from service.models.store import ModelStore  # noqa: E402
from service.models.text_generate import generate  # noqa: E402
from tests.support.sd_tiny import diffusers_pipeline, tiny_sd_store  # noqa: E402

PROMPTS = [("a red cat", "the dog"), ("the dog " * 3, "")]
STEPS, CFG = 6, 5.0


@pytest.mark.parametrize("name", ["sd1", "sd1v", "sdxl"])
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_matches_diffusers_pipeline(name: str, sampler: str) -> None:
    sd = ModelStore(tiny_sd_store()).load(name).text_model  # type: ignore[attr-defined]
    cls = EulerDiscreteScheduler if sampler == "euler" else DPMSolverMultistepScheduler
    scheduler = cls.from_config(sd.components.scheduler_config)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = diffusers_pipeline(sd, scheduler)(
            [p for p, _ in PROMPTS],
            negative_prompt=[n for _, n in PROMPTS],
            num_inference_steps=STEPS,
            guidance_scale=CFG,
            height=64,
            width=64,
            latents=noise.clone(),
            output_type="latent",
        ).images
    scheduler.set_timesteps(STEPS)
    sigmas = scheduler.sigmas.clone()
    assert sigmas[-1] == 0 and len(sigmas) == STEPS + 1
    start = noise * (sigmas[0] if sampler == "euler" else (sigmas[0] ** 2 + 1) ** 0.5)
    ours = torch.cat(
        [
            generate(
                sd,
                p,
                n,
                seeds=[0],
                sampler=sampler,
                steps=STEPS,
                cfg_scale=CFG,
                width=64,
                height=64,
                sigmas=sigmas,
                x_start=start[i : i + 1],
                output="latents",
            )
            for i, (p, n) in enumerate(PROMPTS)
        ]
    )
    err = float((ours - ref).abs().max())
    assert err <= 1e-4, f"max |ours - diffusers| = {err:.3g} (latents up to {float(ref.abs().max()):.3g})"

"""The sampling driver: CFG rescale against diffusers' formula, and the driver as KSampler runs it."""

from __future__ import annotations

import pytest
import torch

from service.sampling.driver import Driver, drive, rescale_cfg
from service.sampling.guidance import cfg_combine
from service.sampling.spec import SamplingSpec


def test_rescale_cfg_matches_diffusers_in_noise_space() -> None:
    diffusers = pytest.importorskip("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64) * 5
    sigma = torch.tensor(5.0, dtype=torch.float64)
    cond, uncond = torch.randn(2, 3, 4, 8, 8, generator=g, dtype=torch.float64)
    guided = cfg_combine(cond, uncond, 7.5)
    for phi in (0.0, 0.7, 1.0):
        ours = rescale_cfg(x, sigma, cond, guided, phi)
        eps_theirs = diffusers.rescale_noise_cfg(
            (x - guided) / sigma, (x - cond) / sigma, guidance_rescale=phi
        )
        torch.testing.assert_close((x - ours) / sigma, eps_theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rescale_cfg(x, sigma, cond, guided, 0.0), guided, rtol=0, atol=1e-12)


class _Toy:
    """A class-conditional toy denoiser: shrinks x towards a per-class image (a gradient pattern, so
    guidance changes the prediction's spread, which is what the rescale corrects)."""

    sigma_min, sigma_max = 0.02, 20.0
    pattern = torch.linspace(-1, 1, 16).view(1, 1, 4, 4)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, class_cond: torch.Tensor) -> torch.Tensor:
        mean = (class_cond.to(x.dtype) - 1.0).view(-1, 1, 1, 1) * self.pattern
        s2 = sigma.view(-1, 1, 1, 1) ** 2
        return (x + mean * s2) / (1 + s2)


def test_guidance_rescale_changes_guided_samples_only() -> None:
    cond = {"class_cond": torch.tensor([0, 2])}
    uncond = {"class_cond": torch.tensor([1, 1])}

    def run(rescale: float, scale: float) -> torch.Tensor:
        spec = SamplingSpec("euler", "karras", 8, [1, 2], guidance_rescale=rescale)
        driver = Driver.start(spec, _Toy(), (2, 1, 4, 4), cond=cond, uncond=uncond, cfg_scale=scale)
        return drive(driver, _Toy())

    assert not torch.allclose(run(0.7, 4.0), run(0.0, 4.0))
    torch.testing.assert_close(run(0.7, 1.0), run(0.0, 1.0))  # cfg_scale 1: no guidance, nothing to rescale
    with pytest.raises(ValueError, match="guidance_rescale"):
        SamplingSpec("euler", guidance_rescale=1.5)


def test_noise_multiplier_scales_img2img_start_noise() -> None:
    """A1111's img2img (processing.py): x = init + (noise * initial_noise_multiplier) * sigma_0; txt2img
    starts are untouched; out of range is an InputError naming the field."""
    from service.sampling.errors import InputError
    from service.sampling.spec import start_latents

    sigmas = torch.tensor([7.0, 3.0, 0.0])
    init = torch.full((2, 3, 4, 4), 0.25)
    plain = SamplingSpec("euler", "karras", 2, [4, 5])
    half = SamplingSpec("euler", "karras", 2, [4, 5], noise_multiplier=0.5)
    noise = start_latents(plain, (2, 3, 4, 4), sigmas) / 7.0
    assert torch.allclose(start_latents(half, (2, 3, 4, 4), sigmas, init=init), init + noise * 0.5 * 7.0)
    assert torch.equal(start_latents(half, (2, 3, 4, 4), sigmas), noise * 7.0)
    with pytest.raises(InputError, match="noise_multiplier"):
        SamplingSpec("euler", "karras", 2, [4], noise_multiplier=-0.1)

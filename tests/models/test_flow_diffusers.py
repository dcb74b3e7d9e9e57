"""Differential: our SD3 / Flux latents equal diffusers' pipelines with FlowMatchEulerDiscreteScheduler
(same components, same seeded noise), txt2img and img2img, to 1e-4."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from service.models.flow_loader import load_flow_diffusers
from service.models.flow_model import FlowModel
from service.models.text_generate import generate
from tests.support.flow_tiny import SIZE, T5_LEN, diffusers_pipeline, run_sd3_pipeline, tiny_flow_store

TOL = 1e-4
PROMPT = "the red cat"


@pytest.fixture(scope="module")
def store() -> Path:
    return tiny_flow_store()


def _model(folder: Path) -> FlowModel:
    return FlowModel(load_flow_diffusers(folder), max_sequence_length=T5_LEN, default_size=SIZE)


def _pipe(m: FlowModel, folder: Path, cls_name: str, **scheduler_config: Any) -> Any:
    return diffusers_pipeline(m.components, folder, cls_name, **scheduler_config)


def _init(m: FlowModel) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    image = torch.rand(1, 3, SIZE, SIZE, generator=g) * 2 - 1
    return m.encode_image(image)


@pytest.mark.parametrize("name", ["sd3", "sd3not5"])
def test_sd3_txt2img_matches_diffusers(store: Path, name: str) -> None:
    m = _model(store / name)
    ours = generate(m, PROMPT, seeds=[7], steps=4, cfg_scale=4.0, output="latents")
    ref = run_sd3_pipeline(_pipe(m, store / name, "StableDiffusion3Pipeline"), PROMPT, 4, 4.0, "latent")
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() <= TOL, float((ours - ref).abs().max())
    assert ref.abs().max() > 0.1


@pytest.mark.parametrize(("steps", "shift"), [(4, 6.0), (2, 13.0), (3, 0.5), (4, 1.0)])
def test_sd3_request_shift_matches_diffusers_built_with_that_shift(
    store: Path, steps: int, shift: float
) -> None:
    """Issue 23: a request's shift moves the whole schedule, as FlowMatchEulerDiscreteScheduler built
    with that shift (before, the last time kept the model's shift: latents 3.5e-4..4.8e-3 apart)."""
    m = _model(store / "sd3")
    ours = generate(
        m, PROMPT, seeds=[7], steps=steps, cfg_scale=4.0, schedule_options={"shift": shift}, output="latents"
    )
    pipe = _pipe(m, store / "sd3", "StableDiffusion3Pipeline", shift=shift)
    ref = run_sd3_pipeline(pipe, PROMPT, steps, 4.0, "latent")
    assert (ours - ref).abs().max() <= TOL, float((ours - ref).abs().max())


def test_sd3_img2img_matches_diffusers(store: Path) -> None:
    m = _model(store / "sd3")
    init = _init(m)
    ours = generate_from_latents(m, init, steps=3, denoise=0.6, cfg_scale=3.0)
    pipe = _pipe(m, store / "sd3", "StableDiffusion3Img2ImgPipeline")
    ref = run_sd3_pipeline(pipe, PROMPT, 5, 3.0, "latent", image=init, strength=0.6)
    assert (ours - ref).abs().max() <= TOL, float((ours - ref).abs().max())


def generate_from_latents(m: FlowModel, init: torch.Tensor, **kw: Any) -> torch.Tensor:
    """img2img from given init latents (diffusers' pipelines take latents as the image)."""
    orig = m.encode_image
    m.encode_image = lambda images: init  # type: ignore[method-assign]
    try:
        image = torch.zeros(1, 3, SIZE, SIZE)
        return generate(m, PROMPT, seeds=[7], init_image=image, output="latents", **kw)
    finally:
        m.encode_image = orig  # type: ignore[method-assign]


@pytest.mark.parametrize(("name", "guidance"), [("flux_schnell", None), ("flux_dev", 2.5)])
def test_flux_txt2img_matches_diffusers(store: Path, name: str, guidance: float | None) -> None:
    m = _model(store / name)
    ours = generate(m, PROMPT, seeds=[7], steps=4, guidance=guidance, output="latents")
    packed = _pipe(m, store / name, "FluxPipeline")(
        PROMPT,
        height=SIZE,
        width=SIZE,
        num_inference_steps=4,
        guidance_scale=guidance or 3.5,
        generator=torch.Generator().manual_seed(7),
        output_type="latent",
        max_sequence_length=T5_LEN,
    ).images
    from service.models.flow_nets import pack

    assert (pack(ours) - packed).abs().max() <= TOL, float((pack(ours) - packed).abs().max())
    assert packed.abs().max() > 0.1


def test_flux_img2img_matches_diffusers(store: Path) -> None:
    from service.models.flow_nets import pack

    m = _model(store / "flux_dev")
    init = _init(m)
    ours = generate_from_latents(m, init, steps=3, denoise=0.6, guidance=3.5)
    packed = _pipe(m, store / "flux_dev", "FluxImg2ImgPipeline")(
        PROMPT,
        image=init,
        strength=0.6,
        height=SIZE,
        width=SIZE,
        num_inference_steps=5,
        guidance_scale=3.5,
        generator=torch.Generator().manual_seed(7),
        output_type="latent",
        max_sequence_length=T5_LEN,
    ).images
    assert (pack(ours) - packed).abs().max() <= TOL, float((pack(ours) - packed).abs().max())


def test_flux_schedule_follows_the_resolution(store: Path) -> None:
    m = _model(store / "flux_schnell")
    assert m.denoiser.dynamic is not None
    assert m.denoiser.shift_for(8, 8) < m.denoiser.shift_for(64, 64)


@pytest.mark.parametrize("name", ["sd3", "flux_schnell"])
def test_inpainting_blends_in_latent_space(store: Path, name: str) -> None:
    """Outside the mask the x0 prediction is the init latents, so a keep-everything mask returns
    them exactly and a repaint-everything mask is txt2img-like img2img."""
    m = _model(store / name)
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) * 2 - 1
    keep = torch.zeros(1, 1, SIZE, SIZE)
    for sampler in ("euler", "dpmpp_2m_sde"):
        out = generate(
            m, PROMPT, seeds=[1], steps=3, init_image=image, mask=keep, sampler=sampler, output="latents"
        )
        assert (out - m.encode_image(image)).abs().max() < 1e-5, sampler
    half = torch.zeros(1, 1, SIZE, SIZE)
    half[..., : SIZE // 2] = 1
    out = generate(m, PROMPT, seeds=[1], steps=3, init_image=image, mask=half, output="latents")
    init = m.encode_image(image)
    assert (out - init)[..., SIZE // 4 :].abs().max() < 1e-5  # the kept right half (latent columns 4..7)
    assert (out - init)[..., : SIZE // 4].abs().max() > 1e-2

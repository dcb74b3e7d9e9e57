"""Prompt encoding (chunks, cache, SDXL pooled + time ids), request checks, img2img and inpainting."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")

from service.models.stable_diffusion import StableDiffusion  # noqa: E402
from service.models.store import ModelStore  # noqa: E402
from service.models.text_generate import generate  # noqa: E402
from service.sampling import registry  # noqa: E402
from service.sampling.errors import InputError  # noqa: E402
from tests.support.sd_tiny import tiny_sd_store  # noqa: E402


def _sd(name: str) -> StableDiffusion:
    sd = ModelStore(tiny_sd_store()).load(name).text_model  # type: ignore[attr-defined]
    assert sd is not None
    return sd  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def sd1() -> StableDiffusion:
    return _sd("sd1")


@pytest.fixture(scope="module")
def sdxl() -> StableDiffusion:
    return _sd("sdxl")


def test_short_prompts_encode_as_diffusers_does(sd1: StableDiffusion) -> None:
    tok = sd1.text.tokenizers[0]
    ref = tok("a red cat", padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert sd1.text.chunk_ids("a red cat") == [ref]
    enc = sd1.text.encode("a red cat")
    with torch.inference_mode():
        want = sd1.components.text_encoders[0](torch.tensor([ref]))[0]
    torch.testing.assert_close(enc.context, want)


def test_long_prompts_are_encoded_in_75_token_chunks(sd1: StableDiffusion) -> None:
    prompt = " ".join(["cat"] * 80 + ["dog"] * 5)  # 85 tokens -> 2 chunks
    chunks = sd1.text.chunk_ids(prompt)
    tok = sd1.text.tokenizers[0]
    assert len(chunks) == 2 and all(len(c) == 77 for c in chunks)
    assert chunks[0][0] == tok.bos_token_id and chunks[0][76] == tok.eos_token_id
    assert chunks[1][:12] == [tok.bos_token_id] + [chunks[0][1]] * 5 + [tok("dog")["input_ids"][1]] * 5 + [
        tok.eos_token_id
    ]
    enc = sd1.text.encode(prompt)
    assert enc.context.shape == (1, 154, 32) and enc.chunks == 2
    # a 1-chunk negative prompt is padded with empty-prompt chunks so cond and uncond rows align
    cond, uncond = sd1.text_conditioning(prompt, "dog", 3, 64, 64, guided=True)
    assert cond["context"].shape == uncond["context"].shape == (3, 154, 32)
    torch.testing.assert_close(uncond["context"][:, 77:], sd1.text.encode("").context.expand(3, -1, -1))


def test_prompt_cache_is_lru(sd1: StableDiffusion) -> None:
    sd1.text.cache_size = 2
    sd1.text._cache.clear()
    hits, misses = sd1.text.hits, sd1.text.misses
    for p in ("one", "two", "one", "three", "two"):
        sd1.text.encode(p)
    # one: miss, two: miss, one: hit, three: miss (evicts two), two: miss (evicts one)
    assert (sd1.text.hits - hits, sd1.text.misses - misses) == (1, 4)
    assert list(sd1.text._cache) == ["three", "two"]
    sd1.text.cache_size = 128


def test_sdxl_conditioning_has_pooled_and_time_ids(sdxl: StableDiffusion) -> None:
    cond, uncond = sdxl.text_conditioning("a red cat", None, 2, 64, 128, guided=True)
    assert cond["context"].shape == (2, 77, 80)  # 32 (CLIP-L) + 48 (bigG) features
    assert cond["y"].shape == (2, 48) and cond["time_ids"].tolist() == [[64, 128, 0, 0, 64, 128]] * 2
    assert uncond is not None and torch.count_nonzero(uncond["context"]) == 0  # no negative: zeros
    assert torch.count_nonzero(uncond["y"]) == 0
    _, uncond_empty = sdxl.text_conditioning("a red cat", "", 2, 64, 128, guided=True)
    assert uncond_empty is not None and torch.count_nonzero(uncond_empty["context"]) > 0
    cond1, none = sdxl.text_conditioning("a red cat", "x", 1, 64, 64, guided=False)
    assert none is None and set(cond1) == {"context", "y", "time_ids"}


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"width": 60}, "width"),
        ({"height": 100}, "height"),
        ({"width": 256}, "width"),  # over the manifest's max_size (128)
        ({"init_image": "not an image"}, "init_image"),
        ({"init_image": torch.zeros(1, 1, 64, 64)}, "init_image"),
        ({"init_image": torch.full((1, 3, 64, 64), 3.0)}, "init_image"),
        ({"init_image": torch.zeros(1, 3, 64, 64), "mask": torch.zeros(1, 1, 32, 64)}, "mask"),
        ({"mask": torch.zeros(1, 1, 64, 64)}, "mask"),
    ],
)
def test_bad_inputs_name_the_field(sd1: StableDiffusion, kwargs: dict, field: str) -> None:
    with pytest.raises(InputError) as err:
        sd1.job_inputs("a cat", **kwargs)
    assert err.value.field == field


def test_sizes_and_init_image_size(sd1: StableDiffusion) -> None:
    assert sd1.job_inputs("a", width=128, height=64).latent_shape == (4, 8, 16)
    inp = sd1.job_inputs("a", init_image=torch.zeros(1, 3, 70, 100))  # size from the image, floored to 8
    assert inp.image_size == (64, 96) and inp.init is not None and inp.init.shape == (1, 4, 8, 12)


@pytest.mark.parametrize("sampler", sorted(registry.SAMPLERS))
def test_every_sampler_runs_on_the_discrete_denoiser(sd1: StableDiffusion, sampler: str) -> None:
    opts = {"rtol": 0.2, "atol": 0.2} if sampler == "dpm_adaptive" else {}  # few evaluations: a smoke test
    out = generate(
        sd1,
        "a red cat",
        "dog",
        seeds=[1],
        sampler=sampler,
        schedule="karras",
        steps=2,
        cfg_scale=3.0,
        sampler_options=opts,
        output="latents",
    )
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


def test_txt2img_is_seeded_per_image(sd1: StableDiffusion) -> None:
    kw = {"sampler": "euler_ancestral", "schedule": "normal", "steps": 3, "output": "latents"}
    both = generate(sd1, "a cat", seeds=[3, 4], **kw)
    alone = generate(sd1, "a cat", seeds=[4], **kw)
    # float32 latents start at sigma_max ~ 14.6 times N(0, 1); batch-size dependent conv kernels leave
    # a few ulps of that scale, so the bound is relative
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(both[0], both[1])


def test_img2img_starts_from_the_init_image(sd1: StableDiffusion) -> None:
    init = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = sd1.encode_image(init)
    kw = {"seeds": [0], "sampler": "euler", "schedule": "normal", "steps": 5, "output": "latents"}
    light = generate(sd1, "a cat", init_image=init, denoise=0.2, **kw)
    full = generate(sd1, "a cat", init_image=init, denoise=1.0, **kw)
    assert (light - latents).abs().mean() < 0.5 * (full - latents).abs().mean()


def test_inpainting_keeps_the_unmasked_latents(sd1: StableDiffusion) -> None:
    init = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :, 32:] = 1  # repaint the right half
    latents = sd1.encode_image(init)
    out = generate(
        sd1,
        "a cat",
        init_image=init,
        mask=mask,
        seeds=[0],
        sampler="euler",
        schedule="normal",
        steps=4,
        output="latents",
    )
    torch.testing.assert_close(out[..., :4], latents[..., :4], atol=1e-5, rtol=0)
    assert (out[..., 4:] - latents[..., 4:]).abs().mean() > 0.05


def test_inpainting_unet_gets_masked_image_conditioning() -> None:
    sd = _sd("sd1inpaint")
    init = torch.rand(1, 3, 64, 64) * 2 - 1
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 32:, :] = 1
    inp = sd.job_inputs("a cat", n=2, cfg_scale=4.0, init_image=init, mask=mask)
    assert inp.mask is None  # no latent blend: the UNet sees the mask
    concat = inp.cond["c_concat"]
    assert inp.uncond is not None and concat.shape == (2, 5, 8, 8)
    torch.testing.assert_close(inp.uncond["c_concat"], concat)
    assert concat[:, 0, :4].sum() == 0 and concat[:, 0, 4:].min() == 1
    masked = sd.encode_image(init * (1 - (mask >= 0.5).float()))
    torch.testing.assert_close(concat[:1, 1:], masked)
    out = generate(sd, "a cat", init_image=init, mask=mask, seeds=[0, 1], sampler="dpmpp_2m", steps=2)
    assert out.shape == (2, 3, 64, 64) and torch.isfinite(out).all()
    assert generate(sd, "a cat", seeds=[0], steps=2).shape == (1, 3, 64, 64)  # txt2img on an inpainting UNet

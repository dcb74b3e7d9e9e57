"""UNet: shapes, conditioning, gradient checkpointing equivalence, config errors, load_denoiser."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from service.models.unet import AUG_COND_DIM, UNet, UNetConfig, load_denoiser

TINY = dict(
    image_size=8, widths=[8, 16], depths=[1, 1], self_attn=[False, True], mapping_dim=16, groups=4, head_dim=8
)


def randomized(cfg: UNetConfig, seed: int = 0) -> UNet:
    """A UNet whose zero-initialised output layers are randomised, so conditioning is visible."""
    torch.manual_seed(seed)
    model = UNet(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_output_shape_matches_input_for_each_variant() -> None:
    for extra in ({}, {"num_classes": 3}, {"has_aug_cond": True}, {"cross_cond_dim": 12}, {"in_channels": 3}):
        cfg = UNetConfig(**TINY, **extra)
        x = torch.randn(2, cfg.in_channels, 8, 8)
        kw = {"cross_cond": torch.randn(2, 5, 12)} if cfg.cross_cond_dim else {}
        assert UNet(cfg)(x, torch.randn(2), **kw).shape == x.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_take_and_give_the_callers_dtype(dtype: torch.dtype) -> None:
    cfg = UNetConfig(**TINY, num_classes=3, has_aug_cond=True, cross_cond_dim=12)
    full = randomized(cfg)
    half = randomized(cfg).to(dtype)
    x, c_noise, y = torch.randn(2, 1, 8, 8), torch.tensor([-1.0, 1.0]), torch.tensor([0, 2])
    kw = {"class_cond": y, "aug_cond": torch.randn(2, AUG_COND_DIM), "cross_cond": torch.randn(2, 5, 12)}
    with torch.no_grad():
        want, got = full(x, c_noise, **kw), half(x, c_noise, **kw)
    assert got.dtype == torch.float32
    scale = want.abs().max().item()
    # measured 0.013 (bf16) and 0.002 (fp16) of the scale; changing the class label moves it 0.076
    assert (got - want).abs().max().item() < 0.03 * scale


def test_class_conditioning_and_null_class() -> None:
    model = randomized(UNetConfig(**TINY, num_classes=3))
    x, c = torch.randn(2, 1, 8, 8), torch.zeros(2)
    a = model(x, c, class_cond=torch.tensor([0, 0]))
    b = model(x, c, class_cond=torch.tensor([1, 1]))
    assert not torch.allclose(a, b)
    null = model(x, c, class_cond=torch.tensor([3, 3]))
    torch.testing.assert_close(model(x, c), null)  # no label = the null class used for CFG


def test_noise_level_and_aug_cond_change_the_output() -> None:
    model = randomized(UNetConfig(**TINY, has_aug_cond=True))
    x = torch.randn(2, 1, 8, 8)
    assert not torch.allclose(model(x, torch.zeros(2)), model(x, torch.ones(2)))
    aug = torch.randn(2, AUG_COND_DIM)
    assert not torch.allclose(model(x, torch.zeros(2)), model(x, torch.zeros(2), aug_cond=aug))
    torch.testing.assert_close(model(x, torch.zeros(2)), model(x, torch.zeros(2), aug_cond=torch.zeros(2, 9)))


def test_cross_attention_uses_its_condition_and_requires_it() -> None:
    model = randomized(UNetConfig(**TINY, cross_cond_dim=12))
    x = torch.randn(2, 1, 8, 8)
    a = model(x, torch.zeros(2), cross_cond=torch.randn(2, 5, 12))
    b = model(x, torch.zeros(2), cross_cond=torch.randn(2, 5, 12))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="cross_cond"):
        model(x, torch.zeros(2))


def test_class_cond_on_unconditional_model_is_an_error() -> None:
    with pytest.raises(ValueError, match="unconditional"):
        UNet(UNetConfig(**TINY))(torch.randn(1, 1, 8, 8), torch.zeros(1), class_cond=torch.tensor([0]))


def test_gradient_checkpointing_gives_same_outputs_and_gradients() -> None:
    cfg = UNetConfig(**TINY, num_classes=3, dropout=0.0)
    plain = randomized(cfg).train()
    ckpt = randomized(UNetConfig(**{**cfg.to_dict(), "gradient_checkpointing": True})).train()
    ckpt.load_state_dict(plain.state_dict())
    x, c, y = torch.randn(3, 1, 8, 8), torch.randn(3), torch.tensor([0, 1, 3])
    outs = []
    for m in (plain, ckpt):
        out = m(x, c, class_cond=y)
        out.pow(2).sum().backward()
        outs.append((out.detach(), [p.grad.clone() for p in m.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    for g0, g1 in zip(outs[0][1], outs[1][1], strict=True):
        torch.testing.assert_close(g0, g1)


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="unknown UNet config keys"):
        UNetConfig.from_dict({**TINY, "widht": [8]})
    with pytest.raises(ValueError, match="same length"):
        UNetConfig(**{**TINY, "depths": [1]})
    with pytest.raises(ValueError, match="divisible by groups"):
        UNetConfig(**{**TINY, "widths": [6, 16]})
    with pytest.raises(ValueError, match="sigma_min"):
        UNetConfig(**TINY, sigma_min=5.0, sigma_max=1.0)


def test_load_denoiser_round_trip(tmp_path) -> None:
    cfg = UNetConfig(**TINY, num_classes=10, sigma_min=0.02, sigma_max=15.0)
    model = randomized(cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "manifest.json").write_text(
        json.dumps({"kind": "unet", "weights": "model.safetensors", "config": "config.json"})
    )
    den, loaded = load_denoiser(tmp_path, "cpu", torch.float32)
    assert loaded == cfg and (den.sigma_min, den.sigma_max) == (0.02, 15.0)
    assert isinstance(den.sigma_min, float)
    x, sigma, y = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 3.0]), torch.tensor([7, 10])
    # D(x; sigma) = c_skip x + c_out F(c_in x, log(sigma)/4) with sigma_data = 0.5
    sd = cfg.sigma_data
    s = sigma[:, None, None, None]
    expected = sd**2 / (s**2 + sd**2) * x + s * sd / (s**2 + sd**2).sqrt() * model(
        x / (s**2 + sd**2).sqrt(), sigma.log() / 4, class_cond=y
    )
    torch.testing.assert_close(den(x, sigma, class_cond=y), expected)
    (tmp_path / "config.json").write_text(json.dumps({**cfg.to_dict(), "extra": 1}))
    with pytest.raises(ValueError, match="unknown UNet config keys"):
        load_denoiser(tmp_path)

"""Denoiser wrappers: Karras preconditioning and loss, v-prediction, discrete eps/v DDPM wrappers."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from service.sampling import DiscreteEpsDenoiser, DiscreteVDenoiser, KarrasDenoiser, VDenoiser


class Net(nn.Module):
    """Records its inputs; output depends nonlinearly on both."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kw: Any) -> torch.Tensor:
        self.last = (x, t)
        return torch.tanh(x) + t.view(-1, *([1] * (x.ndim - 1))) * 0.01


def _alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def test_karras_scalings_and_identity() -> None:
    net = Net()
    d = KarrasDenoiser(net, sigma_data=0.5).double()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    out = d(x, sigma)
    c_skip = 0.25 / (sigma**2 + 0.25)
    c_out = sigma * 0.5 / (sigma**2 + 0.25) ** 0.5
    c_in = 1 / (sigma**2 + 0.25) ** 0.5
    expected = torch.tanh(x * c_in.view(-1, 1, 1, 1)) + (sigma.log() / 4).view(-1, 1, 1, 1) * 0.01
    assert torch.allclose(out, expected * c_out.view(-1, 1, 1, 1) + x * c_skip.view(-1, 1, 1, 1))
    assert torch.allclose(net.last[1], sigma.log() / 4)


@pytest.mark.parametrize("weighting", ["karras", "soft-min-snr", "snr"])
def test_karras_loss_is_zero_for_perfect_model_and_weighted(weighting: str) -> None:
    clean = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    noise = torch.randn_like(clean)
    sigma = torch.tensor([0.2, 0.7, 2.0, 9.0], dtype=torch.float64)

    class Oracle(nn.Module):
        """Outputs exactly the preconditioned target (knows the clean image)."""

        def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
            s = c_noise.mul(4).exp().view(-1, 1, 1, 1)
            c_skip, c_out = 1 / (s**2 + 1), s / (s**2 + 1) ** 0.5
            return (clean - c_skip * (clean + noise * s)) / c_out

    assert KarrasDenoiser(Oracle(), weighting=weighting).loss(clean, noise, sigma).abs().max() < 1e-10
    loss = KarrasDenoiser(Net(), sigma_data=1.0, weighting=weighting).loss(clean, noise, sigma)
    ref = KarrasDenoiser(Net(), sigma_data=1.0, weighting="karras").loss(clean, noise, sigma)
    w = {
        "karras": torch.ones_like(sigma),
        "snr": 1 / (sigma**2 + 1),
        "soft-min-snr": sigma**2 / (sigma**2 + 1) ** 2,
    }
    assert torch.allclose(loss, ref * w[weighting])
    with pytest.raises(ValueError, match="weighting"):
        KarrasDenoiser(nn.Identity(), weighting="min-snr-5")


def test_v_denoiser_matches_k_diffusion(kd: Any) -> None:
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    ours, theirs = VDenoiser(Net()), kd.external.VDenoiser(Net())
    assert torch.allclose(ours(x, sigma), theirs(x, sigma), atol=1e-12)
    noise = torch.randn_like(x)
    assert torch.allclose(ours.loss(x, noise, sigma), theirs.loss(x, noise, sigma), atol=1e-12)


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("kind", ["eps", "v"])
def test_discrete_wrappers_match_k_diffusion(kd: Any, quantize: bool, kind: str) -> None:
    ac = _alphas_cumprod()
    if kind == "eps":
        ours, theirs = (
            DiscreteEpsDenoiser(Net(), ac, quantize),
            kd.external.DiscreteEpsDDPMDenoiser(Net(), ac, quantize),
        )
    else:
        ours, theirs = (
            DiscreteVDenoiser(Net(), ac, quantize),
            kd.external.DiscreteVDDPMDenoiser(Net(), ac, quantize),
        )
    sigma = torch.tensor([0.0292, 0.5, 3.3, 14.6], dtype=torch.float64)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    assert torch.allclose(ours(x, sigma), theirs(x, sigma), atol=1e-10)
    assert torch.equal(ours.sigma_to_t(sigma), theirs.sigma_to_t(sigma))
    for n in (1, 10, 25):
        assert torch.allclose(ours.get_sigmas(n).double(), theirs.get_sigmas(n).double(), rtol=1e-6)
    assert abs(ours.sigma_min - 0.0292) < 1e-3 and abs(ours.sigma_max - 14.6146) < 1e-3
    t = torch.tensor([0.0, 10.5, 999.0], dtype=torch.float64)
    assert torch.allclose(ours.t_to_sigma(t), theirs.t_to_sigma(t).double(), rtol=1e-6)

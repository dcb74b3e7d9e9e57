"""Denoiser wrappers: turn a network into D(x; sigma) for the samplers.

- :class:`KarrasDenoiser`: Karras et al. (2022) preconditioning (c_skip, c_out, c_in, c_noise) + loss.
- :class:`VDenoiser`: continuous v-prediction models (t = atan(sigma) * 2 / pi).
- :class:`DiscreteEpsDenoiser` / :class:`DiscreteVDenoiser`: DDPM-trained eps / v networks over
  their discrete sigma table (from alphas_cumprod), with sigma_to_t / t_to_sigma.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .utils import append_dims, append_zero

WEIGHTINGS = ("karras", "soft-min-snr", "snr")


class KarrasDenoiser(nn.Module):
    """Karras et al. (2022) preconditioner; the inner model is called as inner(c_in * x, log(sigma) / 4)."""

    def __init__(
        self,
        inner_model: nn.Module,
        sigma_data: float = 1.0,
        weighting: str = "karras",
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
    ) -> None:
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data!r}")
        self.inner_model = inner_model
        self.sigma_data = float(sigma_data)
        self.weighting = weighting
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def get_scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2) ** 0.5
        c_in = 1 / (sigma**2 + sd2) ** 0.5
        return c_skip, c_out, c_in

    def loss_weight(self, sigma: Tensor) -> Tensor:
        sd2 = self.sigma_data**2
        if self.weighting == "soft-min-snr":
            return (sigma * self.sigma_data) ** 2 / (sigma**2 + sd2) ** 2
        if self.weighting == "snr":
            return sd2 / (sigma**2 + sd2)
        return torch.ones_like(sigma)

    def loss(self, input: Tensor, noise: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        """Per-example weighted MSE between the network output and its preconditioned target."""
        c_skip, c_out, c_in = (append_dims(c, input.ndim) for c in self.get_scalings(sigma))
        noised_input = input + noise * append_dims(sigma, input.ndim)
        model_output = self.inner_model(noised_input * c_in, sigma.log() / 4, **kwargs)
        target = (input - c_skip * noised_input) / c_out
        return (model_output - target).pow(2).flatten(1).mean(1) * self.loss_weight(sigma)

    def forward(self, input: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        c_skip, c_out, c_in = (append_dims(c, input.ndim) for c in self.get_scalings(sigma))
        return self.inner_model(input * c_in, sigma.log() / 4, **kwargs) * c_out + input * c_skip


class VDenoiser(nn.Module):
    """Continuous-time v-prediction wrapper (v-diffusion): the inner model gets t = atan(sigma) * 2 / pi."""

    def __init__(self, inner_model: nn.Module, sigma_min: float = 1e-3, sigma_max: float = 1e3) -> None:
        super().__init__()
        self.inner_model = inner_model
        self.sigma_data = 1.0
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def get_scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c_skip = 1 / (sigma**2 + 1)
        c_out = -sigma / (sigma**2 + 1) ** 0.5
        c_in = 1 / (sigma**2 + 1) ** 0.5
        return c_skip, c_out, c_in

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        return sigma.atan() / math.pi * 2

    def t_to_sigma(self, t: Tensor) -> Tensor:
        return (t * math.pi / 2).tan()

    def loss(self, input: Tensor, noise: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        c_skip, c_out, c_in = (append_dims(c, input.ndim) for c in self.get_scalings(sigma))
        noised_input = input + noise * append_dims(sigma, input.ndim)
        model_output = self.inner_model(noised_input * c_in, self.sigma_to_t(sigma), **kwargs)
        target = (input - c_skip * noised_input) / c_out
        return (model_output - target).pow(2).flatten(1).mean(1)

    def forward(self, input: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        c_skip, c_out, c_in = (append_dims(c, input.ndim) for c in self.get_scalings(sigma))
        return self.inner_model(input * c_in, self.sigma_to_t(sigma), **kwargs) * c_out + input * c_skip


class DiscreteSchedule(nn.Module):
    """Map between continuous sigmas and a model's discrete table (index t = 0 .. T-1, ascending sigma)."""

    sigmas: Tensor
    log_sigmas: Tensor

    def __init__(self, sigmas: Tensor, quantize: bool) -> None:
        super().__init__()
        if (
            sigmas.ndim != 1
            or len(sigmas) < 2
            or not (sigmas[1:] > sigmas[:-1]).all()
            or not (sigmas > 0).all()
        ):
            raise ValueError("the discrete sigma table must be 1-D, positive and strictly ascending")
        self.register_buffer("sigmas", sigmas)
        self.register_buffer("log_sigmas", sigmas.log())
        self.quantize = quantize

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def get_sigmas(self, n: int | None = None) -> Tensor:
        """n sigmas uniform in t from T-1 to 0, plus a final 0 (all T when n is None)."""
        if n is None:
            return append_zero(self.sigmas.flip(0))
        if n < 1:
            raise ValueError(f"steps must be >= 1, got {n}")
        t = torch.linspace(len(self.sigmas) - 1, 0, n, device=self.sigmas.device)
        return append_zero(self.t_to_sigma(t))

    def sigma_to_t(self, sigma: Tensor, quantize: bool | None = None) -> Tensor:
        """Nearest index when quantized, else linear interpolation in log sigma."""
        quantize = self.quantize if quantize is None else quantize
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        if quantize:
            return dists.abs().argmin(dim=0).view(sigma.shape)
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        return ((1 - w) * low_idx + w * high_idx).view(sigma.shape)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        t = t.float() if not t.is_floating_point() else t
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]).exp()


def sigmas_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


class DiscreteDDPMDenoiser(DiscreteSchedule):
    """A network trained on a DDPM schedule alphas_cumprod, wrapped as a denoiser D(x; sigma)."""

    def __init__(self, model: nn.Module, alphas_cumprod: Tensor, quantize: bool = False) -> None:
        super().__init__(sigmas_from_alphas_cumprod(alphas_cumprod), quantize)
        self.inner_model = model
        self.sigma_data = 1.0


class DiscreteEpsDenoiser(DiscreteDDPMDenoiser):
    """DDPM eps-prediction network: D = x - sigma * eps(x / sqrt(sigma^2 + 1), t)."""

    def get_eps(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.inner_model(*args, **kwargs)

    def forward(self, input: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        c_out = append_dims(-sigma, input.ndim)
        c_in = append_dims(1 / (sigma**2 + 1) ** 0.5, input.ndim)
        return input + self.get_eps(input * c_in, self.sigma_to_t(sigma), **kwargs) * c_out


class DiscreteVDenoiser(DiscreteDDPMDenoiser):
    """DDPM v-prediction network: c_skip = 1/(s^2+1), c_out = -s/sqrt(s^2+1), c_in = 1/sqrt(s^2+1)."""

    def get_v(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.inner_model(*args, **kwargs)

    def forward(self, input: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        c_skip = append_dims(1 / (sigma**2 + 1), input.ndim)
        c_out = append_dims(-sigma / (sigma**2 + 1) ** 0.5, input.ndim)
        c_in = append_dims(1 / (sigma**2 + 1) ** 0.5, input.ndim)
        return self.get_v(input * c_in, self.sigma_to_t(sigma), **kwargs) * c_out + input * c_skip

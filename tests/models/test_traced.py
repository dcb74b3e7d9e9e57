"""TracedModule: a trace per input signature, equal to eager; eager for training and on any mismatch."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import Tensor, nn

from service.models.traced import TracedModule, trace_denoiser
from service.models.unet import UNetConfig
from service.sampling.denoisers import KarrasDenoiser

from .test_unet import TINY, randomized

VARIANTS = {
    "unconditional": ({}, lambda b: {}),
    "class": ({"num_classes": 3}, lambda b: {"class_cond": torch.arange(b) % 4}),
    "aug": ({"has_aug_cond": True}, lambda b: {"aug_cond": torch.randn(b, 9)}),
    "cross": ({"cross_cond_dim": 12}, lambda b: {"cross_cond": torch.randn(b, 5, 12)}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_trace_equals_eager_at_every_batch_size(variant: str) -> None:
    extra, cond = VARIANTS[variant]
    eager = randomized(UNetConfig(**TINY, **extra))
    traced = TracedModule(eager)
    torch.manual_seed(1)
    with torch.inference_mode():
        for b in (4, 1, 9):
            x, c_noise, kw = torch.randn(b, 1, 8, 8), torch.randn(b), cond(b)
            want = eager(x, c_noise, **kw)
            torch.testing.assert_close(traced(x, c_noise, **kw), want, rtol=1e-5, atol=1e-6)
    assert len(traced._traces) == 1 and None not in traced._traces.values()  # one real trace, reused


def test_keyword_order_and_none_values_do_not_change_the_signature() -> None:
    eager = randomized(UNetConfig(**TINY, num_classes=3, has_aug_cond=True))
    traced = TracedModule(eager)
    x, c_noise, y, aug = torch.randn(2, 1, 8, 8), torch.randn(2), torch.tensor([0, 3]), torch.randn(2, 9)
    with torch.inference_mode():
        a = traced(x, c_noise, class_cond=y, aug_cond=aug)
        b = traced(x, c_noise, aug_cond=aug, class_cond=y, cross_cond=None)
        torch.testing.assert_close(a, eager(x, c_noise, class_cond=y, aug_cond=aug))
    torch.testing.assert_close(a, b)
    assert len(traced._traces) == 1


def test_training_and_grad_mode_run_eager() -> None:
    eager = randomized(UNetConfig(**TINY))
    traced = TracedModule(eager)
    out = traced(torch.randn(2, 1, 8, 8), torch.randn(2))
    assert out.requires_grad and not traced._traces


class BakesBatchSize(nn.Module):
    """Turns the batch size into a Python int, which a trace records as a constant."""

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        return x + torch.arange(int(x.shape[0]), dtype=x.dtype).view(-1, 1, 1, 1)


def test_a_trace_that_differs_from_eager_is_dropped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    traced = TracedModule(BakesBatchSize().eval())
    with caplog.at_level(logging.WARNING, logger="service.models.traced"), torch.inference_mode():
        for b in (3, 5):
            x = torch.zeros(b, 1, 2, 2)
            assert traced(x, torch.zeros(b))[:, 0, 0, 0].tolist() == list(range(b))
    assert list(traced._traces.values()) == [None]
    assert "staying eager" in caplog.text


def test_trace_denoiser_wraps_only_the_project_unet() -> None:
    unet = randomized(UNetConfig(**TINY, num_classes=3))
    den = KarrasDenoiser(unet, sigma_data=0.5)
    x, sigma, y = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 1.0, 10.0]), torch.tensor([0, 1, 3])
    with torch.inference_mode():
        want = den(x, sigma, class_cond=y)
    assert trace_denoiser(den, (x[:1], {"class_cond": y[:1]}))
    assert isinstance(den.inner_model, TracedModule) and len(den.inner_model._traces) == 1  # traced at once
    assert not trace_denoiser(den)  # already wrapped
    with torch.inference_mode():
        torch.testing.assert_close(den(x, sigma, class_cond=y), want, rtol=1e-5, atol=1e-6)
    assert not trace_denoiser(KarrasDenoiser(nn.Identity()))

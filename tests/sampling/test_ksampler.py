"""The KSampler facade from the design notes."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from service import sampling
from service.sampling import CosineSchedule, CustomSchedule, KarrasSchedule, KSampler
from tests.support.toys import toy_image_model


class ClassToy:
    """Class-conditional toy: the label shifts the prediction, so guidance is visible."""

    sigma_min, sigma_max, num_classes = 0.03, 14.6, 10

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(
        self, x: torch.Tensor, sigma: torch.Tensor, class_cond: torch.Tensor | None = None, **kw: Any
    ) -> torch.Tensor:
        self.batches.append(x.shape[0])
        shift = (class_cond.float() - 5.0).view(-1, *([1] * (x.ndim - 1))) * 0.1
        return toy_image_model(x, sigma) + shift


def test_sample_from_unit_noise_matches_k_api() -> None:
    model = ClassToy()
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    ours = KSampler(model, "dpmpp_2m", "karras").sample(x, steps=12, condition=torch.tensor([1, 2]))
    sigmas = sampling.get_sigmas_karras(12, model.sigma_min, model.sigma_max)
    ref = sampling.sample_dpmpp_2m(
        model, x * sigmas[0], sigmas, extra_args={"class_cond": torch.tensor([1, 2])}, disable=True
    )
    assert torch.allclose(ours, ref, atol=1e-6)


def test_guidance_is_one_batched_call_per_evaluation() -> None:
    model = ClassToy()
    labels = torch.tensor([3, 3, 7, 7])
    out = KSampler(model, "euler").sample(
        shape=(4, 1, 4, 4), steps=5, seed=[1, 2, 3, 4], condition=labels, cfg_scale=3.0
    )
    assert model.batches == [8] * 5  # cond + uncond rows together
    plain = KSampler(ClassToy(), "euler").sample(
        shape=(4, 1, 4, 4), steps=5, seed=[1, 2, 3, 4], condition=labels
    )
    assert (out - plain).abs().max() > 1e-3


def test_guided_equals_manual_combination() -> None:
    class Linear(ClassToy):
        pass

    model = Linear()
    lab = torch.tensor([9])
    g = KSampler(model, "euler").sample(shape=(1, 1, 2, 2), steps=1, seed=0, condition=lab, cfg_scale=2.5)
    c = KSampler(model, "euler").sample(shape=(1, 1, 2, 2), steps=1, seed=0, condition=lab)
    u = KSampler(model, "euler").sample(shape=(1, 1, 2, 2), steps=1, seed=0, condition=torch.tensor([10]))
    # One Euler step to sigma=0 returns the denoised prediction itself: guidance combines linearly.
    assert torch.allclose(g, u + 2.5 * (c - u), atol=1e-5)


def test_schedule_objects() -> None:
    model = ClassToy()
    for sched in (
        KarrasSchedule(0.03, 14.6, rho=5.0),
        CosineSchedule(0.03, 14.6),
        CustomSchedule((14.6, 3.0, 0.5)),
    ):
        steps = 3 if isinstance(sched, CustomSchedule) else 6
        out = KSampler(model, "heun", schedule=sched).sample(
            shape=(1, 1, 2, 2), steps=steps, seed=1, condition=torch.tensor([0])
        )
        assert torch.isfinite(out).all()
    s = CosineSchedule(0.03, 14.6)(8)
    assert abs(float(s[0]) - 14.6) < 1e-4 and abs(float(s[-2]) - 0.03) < 1e-6 and s[-1] == 0


def test_schedule_options_override_the_models_sigma_range() -> None:
    """sigma_min / sigma_max in schedule_options replace the model's range (they used to clash with it)."""
    model = ClassToy()
    for name, fn in (
        ("karras", sampling.get_sigmas_karras),
        ("exponential", sampling.get_sigmas_exponential),
    ):
        for opts, (lo, hi) in (
            ({"sigma_min": 0.5}, (0.5, 14.6)),
            ({"sigma_max": 3.0}, (0.03, 3.0)),
            ({"sigma_min": 0.1, "sigma_max": 2.0}, (0.1, 2.0)),
        ):
            spec = sampling.SamplingSpec("euler", name, 5, [0], schedule_options=opts)
            torch.testing.assert_close(sampling.make_sigmas(spec, model), fn(5, lo, hi))
    clash = sampling.SamplingSpec("euler", "karras", 5, [0], schedule_options={"sigma_min": 20.0})
    with pytest.raises(ValueError, match="sigma_min"):
        sampling.make_sigmas(clash, model)  # above the model's sigma_max of 14.6


def test_img2img_starts_part_way() -> None:
    model = ClassToy()
    init = torch.full((1, 1, 4, 4), 0.5)
    seen: list[dict] = []
    ks = KSampler(model, "euler", "karras")
    out = ks.sample(
        shape=(1, 1, 4, 4),
        steps=5,
        seed=2,
        condition=torch.tensor([5]),
        init=init,
        denoise=0.5,
        callback=seen.append,
    )
    full = sampling.get_sigmas_karras(10, model.sigma_min, model.sigma_max)
    assert len(seen) == 5 and abs(float(seen[0]["sigma"]) - float(full[5])) < 1e-6
    # Starts from init + noise at that sigma (not pure noise).
    assert (seen[0]["x"] - init).std() < float(full[5]) * 1.5
    assert torch.isfinite(out).all()


def test_default_seeds_follow_torch_manual_seed() -> None:
    ks = KSampler(ClassToy(), "euler_ancestral")
    torch.manual_seed(0)
    a = ks.sample(shape=(2, 1, 2, 2), steps=4, condition=torch.tensor([1, 1]))
    torch.manual_seed(0)
    b = ks.sample(shape=(2, 1, 2, 2), steps=4, condition=torch.tensor([1, 1]))
    assert torch.equal(a, b)

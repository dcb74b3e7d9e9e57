"""One contract suite over the whole sampler registry (k-diffusion's and any added later)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from service.sampling import SAMPLERS, SCHEDULES, KSampler, get_sampler
from service.sampling.registry import UnknownNameError
from tests.sampling.conftest import toy_image_model


class Toy:
    """Row-independent toy denoiser with the attributes KSampler expects; counts calls."""

    sigma_min, sigma_max = 0.03, 14.6

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kw: Any) -> torch.Tensor:
        self.calls += 1
        return toy_image_model(x, sigma)


NAMES = sorted(SAMPLERS)
SEEDS = [11, 5, 99, 1234, 7, 42, 2**31 - 5, 0]


@pytest.mark.parametrize("name", NAMES)
def test_batch_invariance(name: str) -> None:
    """Image b inside a batch of 8 mixed seeds equals the same seed sampled alone (all samplers)."""
    ks = KSampler(Toy(), name, "karras")
    batch = ks.sample(shape=(8, 2, 4, 4), steps=6, seed=SEEDS)
    for b in (0, 3, 6):
        alone = ks.sample(shape=(1, 2, 4, 4), steps=6, seed=[SEEDS[b]])
        assert (batch[b] - alone[0]).abs().max().item() <= 1e-5, f"{name}: image {b} depends on its batch"
    assert torch.isfinite(batch).all()
    assert (batch[0] - batch[1]).abs().max() > 1e-3  # different seeds give different images


@pytest.mark.parametrize("name", NAMES)
def test_seeded_reproducible_and_callback(name: str) -> None:
    info = get_sampler(name)
    model = Toy()
    seen: list[dict] = []
    a = KSampler(model, name, "exponential").sample(shape=(2, 1, 4, 4), steps=5, seed=3, callback=seen.append)
    b = KSampler(Toy(), name, "exponential").sample(shape=(2, 1, 4, 4), steps=5, seed=3)
    assert torch.equal(a, b)
    assert model.calls >= 1
    if not info.batch_coupled:  # batch-coupled (adaptive) samplers run per image with their own step count
        assert model.calls <= info.expected_nfe(5)
    assert seen and {"x", "i", "sigma", "sigma_hat", "denoised"} <= set(seen[0])


@pytest.mark.parametrize("name", NAMES)
def test_metadata_and_option_bounds(name: str) -> None:
    info = get_sampler(name)
    assert info.doc and info.order >= 1 and info.nfe_per_step >= 1
    assert info.noise in {"none", "gaussian", "brownian"}
    described = info.describe()
    assert described["name"] == name
    for opt, spec in info.bounds.items():
        if spec.choices is None:
            inf = float("inf")
            bad = spec.hi * 2 + 1 if spec.hi != inf else (spec.lo - 1 if spec.lo != -inf else float("nan"))
            with pytest.raises(ValueError, match=opt):
                KSampler(Toy(), name, **{opt: bad})
        else:
            with pytest.raises(ValueError, match=opt):
                KSampler(Toy(), name, **{opt: "not-a-choice"})
    with pytest.raises(ValueError, match="unknown option"):
        KSampler(Toy(), name, no_such_option=1.0)


@pytest.mark.parametrize("schedule", sorted(s for s, i in SCHEDULES.items() if not i.needs_discrete))
def test_every_schedule_descends_to_zero(schedule: str) -> None:
    from service.sampling.registry import schedule_sigmas

    for n in (1, 2, 17):
        s = schedule_sigmas(schedule, n, 0.03, 14.6)
        assert s.shape == (n + 1,) and s[-1] == 0 and (s[:-1] > 0).all()
        assert (s[1:] < s[:-1]).all()


def test_unknown_names_list_valid_ones() -> None:
    with pytest.raises(UnknownNameError, match="dpmpp_2m"):
        KSampler(Toy(), "dpmpp_9m")
    with pytest.raises(UnknownNameError, match="karras"):
        KSampler(Toy(), "euler", schedule="karas")

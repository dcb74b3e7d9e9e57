"""One contract suite over the whole sampler and schedule registry (k-diffusion's and any added later).

Every test here is parametrized by the registry, so a sampler or schedule added with ``@sampler`` /
``@schedule`` is checked without editing this file.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import pytest
import torch

from service import sampling
from service.sampling import SAMPLERS, SCHEDULES, KSampler, get_sampler, get_schedule
from service.sampling.aliases import resolve, resolve_schedule
from service.sampling.registry import Option, UnknownNameError
from tests.support.toys import Toy

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


def _default_in_bounds(name: str, spec: Option) -> None:
    if spec.default is None:  # "not given": the model's value (sigma range) or a rule of the sampler
        return
    if spec.choices is not None:
        assert spec.default in spec.choices, f"{name}: default {spec.default!r} not among its choices"
    else:
        assert spec.lo <= spec.default <= spec.hi, (
            f"{name}: default {spec.default} outside [{spec.lo}, {spec.hi}]"
        )
        assert not spec.integer or spec.default == int(spec.default), (
            f"{name}: integer option, default {spec.default}"
        )


def _signature_defaults(fn: Any) -> dict[str, Any]:
    return {
        n: (None if p.default is inspect.Parameter.empty else p.default)
        for n, p in inspect.signature(fn).parameters.items()
    }


@pytest.mark.parametrize("name", NAMES)
def test_sampler_contract(name: str) -> None:
    """Defaults are the stepper's, sample_<name> exists and takes every option, metadata is complete."""
    info = get_sampler(name)
    defaults = _signature_defaults(info.stepper)  # follows the sigma-range adapter to its stepper
    for opt, spec in info.bounds.items():
        assert opt in defaults, f"{name}: bounds for {opt}, which the stepper does not take"
        assert spec.default == defaults[opt] or (
            spec.default != spec.default and defaults[opt] != defaults[opt]
        )
        _default_in_bounds(f"{name}.{opt}", spec)
    sample = getattr(sampling, f"sample_{name}")
    assert sample is info.sample and sample.__name__ == f"sample_{name}"
    params = inspect.signature(sample).parameters
    assert list(params)[:2] == ["model", "x"]
    for opt, spec in info.bounds.items():
        assert params[opt].default == spec.default, f"sample_{name}.{opt}"
    assert info.doc and sample.__doc__  # the stepper's, or k-diffusion's for dpm_fast / dpm_adaptive
    assert info.order >= 1 and info.nfe_per_step >= 1 and info.origin
    assert info.noise in {"none", "gaussian", "brownian"}
    assert not info.stochastic or info.noise != "none", f"{name}: stochastic, but gets no noise sampler"
    assert info.expected_nfe(1) >= 1 and info.expected_nfe(10) >= info.expected_nfe(2)
    for alias in info.aliases:
        assert resolve(alias)[0] == name, f"{name}: alias {alias!r} resolves elsewhere"


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_contract(name: str) -> None:
    info = get_schedule(name)
    fn = getattr(sampling, f"get_sigmas_{name}")
    assert fn is info.function
    defaults = _signature_defaults(fn)
    for opt, spec in info.bounds.items():
        assert opt in defaults and spec.default == defaults[opt], f"{name}.{opt}"
        _default_in_bounds(f"{name}.{opt}", spec)
    assert info.doc and info.describe()["name"] == name
    assert not (info.needs_discrete and info.uses_range)
    if not info.uses_range:
        assert not {"sigma_min", "sigma_max"} & set(info.bounds), f"{name} ignores the range it offers"
    for alias in info.aliases:
        assert resolve_schedule(alias) == name
    if not info.needs_discrete:  # the schedule object makes the same sigmas as the function
        opts = {k: v for k, v in info.options.items() if v is not None}
        lo_hi = {"sigma_min": 0.03, "sigma_max": 14.6} if "sigma_min" in defaults and info.uses_range else {}
        want = info.fn(6, lo_hi.get("sigma_min"), lo_hi.get("sigma_max"), **opts)
        assert torch.equal(sampling.Schedule(name, **lo_hi, **opts)(6), want)
        assert math.isfinite(float(want[0])) and want[-1] == 0

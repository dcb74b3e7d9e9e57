"""A two-pass driver (hires fix) equals its two passes run one after the other, and counts progress
over both as the engine and A1111's /progress read it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from service.sampling.driver import Driver, drive
from service.sampling.passes import Passes
from service.sampling.spec import SamplingSpec, make_sigmas
from tests.support.toys import toy_image_model


class _Model:
    sigma_min, sigma_max = 0.02, 20.0


def _second(spec: SamplingSpec) -> tuple[SamplingSpec, torch.Tensor]:
    spec2 = SamplingSpec("dpmpp_2m", "karras", steps=3, seeds=spec.seeds, denoise=0.5)
    return spec2, make_sigmas(spec2, _Model())


def test_passes_equal_the_two_passes_in_turn_and_count_both() -> None:
    spec = SamplingSpec("euler_ancestral", "karras", steps=4, seeds=[3, 4])
    spec2, sigmas2 = _second(spec)
    assert len(sigmas2) == 4  # the last 3 steps of a 6-step schedule: int(3 / 0.5)

    def start(spec: SamplingSpec, shape: tuple[int, ...], init: torch.Tensor | None = None) -> Driver:
        sigmas = sigmas2 if init is not None else None
        return Driver.start(spec, _Model(), shape, init=init, sigmas=sigmas)

    def next_pass(latents: torch.Tensor) -> Driver:
        return start(spec2, (2, 1, 16, 16), F.interpolate(latents, size=(16, 16), mode="bilinear"))

    first = drive(start(spec, (2, 1, 8, 8)), toy_image_model)
    want = drive(next_pass(first), toy_image_model)

    passes = Passes(start(spec, (2, 1, 8, 8)), next_pass, spec2.steps, 3)
    assert (passes.total_steps, passes.passes, passes.pass_steps, passes.expected_evals) == (7, 2, 4, 7)
    seen = []
    while not passes.done:
        for track in passes.pending():
            x, sigma, cond = passes.inputs(track)
            passes.feed(track, toy_image_model(x, sigma, **cond))
        seen.append((passes.pass_no, passes.pass_step, passes.pass_steps, passes.step, passes.evals))
    assert seen == [(0, 1, 4, 1, 1), (0, 2, 4, 2, 2), (0, 3, 4, 3, 3), (1, 0, 3, 4, 4),
                    (1, 1, 3, 5, 5), (1, 2, 3, 6, 6), (1, 3, 3, 7, 7)]  # fmt: skip
    out = passes.result()
    assert out.shape == (2, 1, 16, 16)
    assert torch.equal(out, want)


def test_adaptive_passes_report_steps_within_their_total_and_a_growing_sigma_fraction() -> None:
    # dpm_adaptive's evaluation count is not known ahead: each pass reports its way down in log sigma,
    # weighed by the evaluations expected of it
    spec = SamplingSpec("dpm_adaptive", "karras", steps=4, seeds=[3, 4])
    spec2 = SamplingSpec("dpm_adaptive", "karras", steps=3, seeds=[3, 4], denoise=0.5)
    sigmas2 = make_sigmas(spec2, _Model())

    def next_pass(latents: torch.Tensor) -> Driver:
        init = F.interpolate(latents, size=(16, 16), mode="bilinear")
        return Driver.start(spec2, _Model(), (2, 1, 16, 16), init=init, sigmas=sigmas2)

    first = Driver.start(spec, _Model(), (2, 1, 8, 8))
    passes = Passes(first, next_pass, spec2.steps, first.expected_evals)
    seen = []
    while not passes.done:
        for track in passes.pending():
            x, sigma, cond = passes.inputs(track)
            passes.feed(track, toy_image_model(x, sigma, **cond))
        seen.append((passes.step, passes.pass_step, passes.pass_steps, passes.sigma_fraction))
    assert passes.evals > passes.expected_evals // 2 > 0
    running = seen[:-1]  # the last look is after the end
    assert all(step <= 7 and pass_step <= pass_steps for step, pass_step, pass_steps, _ in running)
    fractions = [f for *_, f in running]
    assert all(f is not None and 0 <= f < 1 for f in fractions)
    assert fractions == sorted(fractions) and fractions[-1] > 0.5  # type: ignore[type-var]
    assert [s for s, *_ in running] == sorted(s for s, *_ in running)
    assert seen[-1][0] == 7

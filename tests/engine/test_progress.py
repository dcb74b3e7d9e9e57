"""Job progress as the engine reports it: steps within the total, a fraction that only grows."""

from __future__ import annotations

import math

from service.engine import Job, JobRequest, JobStatus
from service.sampling import registry
from tests.support.engine_fakes import FakeDenoiser, make_engine, request, run

Snapshot = tuple[int, int, int, int, float, float | None]  # step, total, evals, expected, fraction, eta


def _watch(req: JobRequest) -> tuple[Job, list[Snapshot]]:
    """Run ``req`` alone and record its progress at every change the engine notifies while it
    samples (after that it is done: encoding)."""

    async def go() -> tuple[Job, list[Snapshot]]:
        engine = make_engine(FakeDenoiser(delay_s=0.001))
        engine.start()
        job = engine.submit(req)
        seen: list[Snapshot] = []
        while not job.status.finished:
            changed = job.change_event()
            if job.status == JobStatus.running and job.t_computed is None and job.progress.evals:
                p = job.progress
                seen.append((p.step, p.total, p.evals, p.expected_evals, p.fraction, job.eta_s()))
            await changed.wait()
        await engine.stop()
        return job, seen

    return run(go)


def test_adaptive_sampler_progress_follows_sigma_and_stays_within_its_steps() -> None:
    # dpm_adaptive takes as many evaluations as its error control needs (here far more than the
    # 3 * 3 - 2 a fixed third-order sampler would): progress is its way down in log sigma
    job, seen = _watch(request("dpm_adaptive", 3, seeds=[1, 2, 3, 4]))
    assert job.status == JobStatus.succeeded
    assert len(seen) > 3 and seen[-1][2] > 7  # it ran past the evaluations 3 steps would suggest
    assert all(step <= total == 3 for step, total, *_ in seen)
    fractions = [f for *_, f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] < 1.0
    assert fractions[-1] > 0.5  # the last look before the end is near it, not stuck at the start
    steps = [s for s, *_ in seen]
    assert steps == sorted(steps)
    # the ETA goes by the fraction and the time so far: none before the first accepted step
    assert all((eta is None) == (f == 0) for *_, f, eta in seen)
    assert all(math.isfinite(eta) and eta >= 0 for *_, eta in seen if eta is not None)
    assert job.progress.fraction == 1.0 and job.progress.step == 3


def test_known_count_samplers_keep_counting_evaluations() -> None:
    job, seen = _watch(request("heun", 6, seeds=[1, 2]))
    expected = registry.get_sampler("heun").expected_nfe(6)
    assert job.status == JobStatus.succeeded and seen
    for step, total, evals, exp, fraction, _ in seen:
        assert total == 6 and step <= 6
        assert exp == max(expected, evals + 1) and fraction == evals / exp

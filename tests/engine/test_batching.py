"""Iteration-level batching: shared model calls, join/leave, modes, batch invariance."""

from __future__ import annotations

import asyncio

import torch

from service.engine import JobStatus, Mode
from tests.support.engine_fakes import FakeDenoiser, make_engine, reference, request, run

MIX = [("euler", 10), ("heun", 5), ("dpmpp_2m", 20), ("euler_ancestral", 7), ("dpmpp_2m_sde", 12), ("lms", 9)]


def test_mixed_samplers_share_model_calls_and_match_direct_sampling() -> None:
    model = FakeDenoiser()
    reqs = [request(s, n, seeds=[i], label=i % 8, cfg=1.0 + (i % 2)) for i, (s, n) in enumerate(MIX)]

    async def go() -> list:
        engine = make_engine(model)
        engine.start()
        jobs = [engine.submit(r) for r in reqs]
        await asyncio.gather(*(j.wait_done() for j in jobs))
        await engine.stop()
        return jobs

    jobs = run(go)
    assert [j.status for j in jobs] == [JobStatus.succeeded] * len(jobs)
    for job, req in zip(jobs, reqs, strict=True):
        torch.testing.assert_close(job.result, reference(FakeDenoiser(), req), atol=1e-5, rtol=0)
    # all six jobs (9 rows, guided ones count two) shared the first call
    assert model.calls[0] == sum(r.rows for r in reqs) == 9
    # far fewer calls than evaluations: the longest job (dpmpp_2m, 20 NFE) bounds the count
    assert len(model.calls) == 20


def test_batch_invariance_alone_vs_among_31_others() -> None:
    probe = request("dpmpp_2m_sde", 15, seeds=[1234], label=5, cfg=2.5)
    alone_model = FakeDenoiser()
    crowd_model = FakeDenoiser()
    others = [
        request(
            MIX[i % len(MIX)][0], MIX[i % len(MIX)][1] + i % 3, seeds=[i, i + 100], label=i % 8, cfg=1 + i % 3
        )
        for i in range(31)
    ]

    async def go(model: FakeDenoiser, reqs: list) -> list:
        engine = make_engine(model, max_batch_rows=256)
        engine.start()
        jobs = [engine.submit(r) for r in reqs]
        await asyncio.gather(*(j.wait_done() for j in jobs))
        await engine.stop()
        return jobs

    alone = run(lambda: go(alone_model, [probe]))[0]
    crowd = run(lambda: go(crowd_model, [*others[:16], probe, *others[16:]]))
    among = crowd[16]
    assert alone.status == among.status == JobStatus.succeeded
    assert max(crowd_model.calls) > 60  # it really shared calls with the others
    assert (alone.result - among.result).abs().max().item() <= 1e-5


def test_new_jobs_join_running_batch_and_finished_jobs_leave() -> None:
    model = FakeDenoiser(delay_s=0.004)

    async def go() -> tuple:
        engine = make_engine(model)
        engine.start()
        long = engine.submit(request("euler", 40, seeds=[1]))
        while long.progress.evals < 5:
            await asyncio.sleep(0.002)
        short = engine.submit(request("euler", 5, seeds=[2]))
        await short.wait_done()
        assert long.status == JobStatus.running  # the short job left while the long one runs on
        await long.wait_done()
        await engine.stop()
        return long, short

    long, short = run(go)
    assert long.status == short.status == JobStatus.succeeded
    assert short.t_started is not None and long.t_computed is not None
    assert short.t_started < long.t_computed
    assert model.calls.count(2) == 5  # 5 shared calls, then back to one row
    assert model.calls[-1] == 1 and len(model.calls) == 40


def test_request_mode_late_job_waits_for_the_whole_batch() -> None:
    model = FakeDenoiser(delay_s=0.002)
    late_req = request("euler", 5, seeds=[3])  # a finished job drops its tensors: keep the request

    async def go() -> tuple:
        engine = make_engine(model, mode=Mode.request)
        engine.start()
        a = engine.submit(request("euler", 20, seeds=[1]))
        b = engine.submit(request("euler", 5, seeds=[2]))
        while a.progress.evals < 3:
            await asyncio.sleep(0.001)
        late = engine.submit(late_req)
        await asyncio.gather(a.wait_done(), b.wait_done(), late.wait_done())
        await engine.stop()
        return a, b, late

    a, b, late = run(go)
    assert late.t_started is not None and a.t_computed is not None
    assert late.t_started >= a.t_computed  # no joining a running batch
    assert b.t_finished is not None and b.t_finished >= a.t_computed  # results come back together
    torch.testing.assert_close(late.result, reference(FakeDenoiser(), late_req), atol=1e-5, rtol=0)


def test_serial_mode_runs_one_job_per_call() -> None:
    model = FakeDenoiser()

    async def go() -> list:
        engine = make_engine(model, mode=Mode.serial)
        engine.start()
        jobs = [engine.submit(request("heun", 4, seeds=[i, i + 1])) for i in range(3)]
        await asyncio.gather(*(j.wait_done() for j in jobs))
        await engine.stop()
        return jobs

    jobs = run(go)
    assert all(j.status == JobStatus.succeeded for j in jobs)
    assert set(model.calls) == {2} and len(model.calls) == 3 * 7


def test_max_batch_rows_caps_every_call_and_oldest_jobs_go_first() -> None:
    model = FakeDenoiser()

    async def go() -> list:
        engine = make_engine(model, max_batch_rows=4)
        engine.start()
        jobs = [engine.submit(request("euler", 6, seeds=[i], cfg=2.0)) for i in range(5)]
        await asyncio.gather(*(j.wait_done() for j in jobs))
        await engine.stop()
        return jobs

    jobs = run(go)
    assert all(j.status == JobStatus.succeeded for j in jobs)
    assert max(model.calls) == 4
    order = sorted(jobs, key=lambda j: j.t_started)
    assert order == jobs


def test_oversized_single_job_is_split_across_calls() -> None:
    model = FakeDenoiser()
    req = request("euler", 3, seeds=list(range(5)), cfg=3.0)  # 10 rows

    async def go():
        engine = make_engine(model, max_batch_rows=4)
        engine.start()
        job = engine.submit(req)
        await job.wait_done()
        await engine.stop()
        return job

    job = run(go)
    assert job.status == JobStatus.succeeded and max(model.calls) <= 4
    torch.testing.assert_close(job.result, reference(FakeDenoiser(), req), atol=1e-5, rtol=0)


def test_cfg_pp_samplers_get_the_uncond_prediction_from_the_engine() -> None:
    """CFG++ samplers re-noise along the uncond prediction: the engine must send it, as KSampler does."""
    names = ["euler_cfg_pp", "dpmpp_2m_cfg_pp", "euler_ancestral_cfg_pp", "res_multistep_cfg_pp", "euler"]
    reqs = [request(s, 8, seeds=[i], label=2, cfg=1.5) for i, s in enumerate(names)]
    plain = request("euler", 8, seeds=[0], label=2, cfg=1.5)

    async def go() -> list:
        engine = make_engine(FakeDenoiser())
        engine.start()
        jobs = [engine.submit(r) for r in [*reqs, plain]]
        await asyncio.gather(*(j.wait_done() for j in jobs))
        await engine.stop()
        return jobs

    jobs = run(go)
    assert [j.status for j in jobs] == [JobStatus.succeeded] * len(jobs), [j.error for j in jobs]
    for job, req in zip(jobs, [*reqs, plain], strict=True):
        torch.testing.assert_close(job.result, reference(FakeDenoiser(), req), atol=1e-5, rtol=0)
    # same seed, same guidance: CFG++ and plain euler differ only through the uncond re-noising
    assert (jobs[0].result - jobs[-1].result).abs().max() > 1e-3

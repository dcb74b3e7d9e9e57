"""Routing of the Ray Serve ingress (pure: no cluster) and the job-id prefix hook."""

from __future__ import annotations

from service.deploy.routing import Placement, incarnation_of, job_prefix, requested_model, slot_of_job
from service.engine.jobs import Job, JobRequest
from service.sampling.spec import SamplingSpec


def test_job_ids_carry_slot_and_incarnation() -> None:
    old = Job.id_prefix
    try:
        Job.id_prefix = job_prefix(3, "a1b2c3")
        job = Job(JobRequest(SamplingSpec("euler", "karras", 1, [0]), 1, {}), "m")
        assert len(job.id) == 32 and job.id.startswith("03a1b2c3")
        assert slot_of_job(job.id) == (3, "a1b2c3")
    finally:
        Job.id_prefix = old
    assert len(Job(JobRequest(SamplingSpec("euler", "karras", 1, [0]), 1, {}), "m").id) == 32


def test_routes() -> None:
    p = Placement([["digits"], ["sd"], []])
    jid = "01abcdef" + "0" * 24
    assert p.route("GET", f"/jobs/{jid}", b"").slots == [1]
    assert p.route("DELETE", f"/jobs/{jid}", b"").kind == "job"
    assert p.route("GET", f"/jobs/{jid}/events", b"").slots == [1]
    assert p.route("GET", "/jobs", b"").kind == "fanout"
    assert p.route("POST", "/sample", b'{"model": "sd"}').slots == [1]
    assert p.route("POST", "/jobs", b'{"model": "other"}').slots == [2]  # only the all-models slot
    assert p.route("POST", "/sample", b"{}").slots == [0, 1, 2]
    assert p.route("POST", "/models/digits/load", b"").slots == [0]
    assert p.route("GET", "/samplers", b"").slots == [0, 1, 2]
    assert requested_model(b"not json") is None and requested_model(b'{"model": 3}') is None
    p.inflight[:] = [2, 0, 1]
    assert p.pick([0, 1, 2]) == 1 and p.pick([0, 2]) == 2
    assert incarnation_of("engine1; incarnation=abc123; replica=x") == "abc123"

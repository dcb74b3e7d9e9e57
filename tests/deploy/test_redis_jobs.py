"""The Redis job store (KDIFF_REDIS_URL) in process, on a redis-server started here: one result per job id
(compare-and-set), leases that a live holder keeps however slow its job and that move to a live replica
when the holder stops, and a job read through another replica. The Ray test (test_ray_serve.py) kills a
real engine replica."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.settings import Settings
from service.engine import ImageResult, Job, JobStatus
from service.serving.jobstore import JOB, RedisJournal, TerminalEvent, placeholder
from service.serving.jobstore.codec import encode_request
from service.serving.jobstore.redis_store import RedisJobs
from service.serving.request import GenerationRequest

from .conftest import ENGINE_SETTINGS
from .redis_server import redis_server

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


def a_job(owner: str = "k1") -> Job:
    job = Job(placeholder(30), "tiny")
    job.owner = owner
    return job


def test_one_end_per_job_id_and_only_from_its_holder(redis_url: str) -> None:
    async def scenario() -> None:
        jobs = RedisJobs(redis_url, "t1", lease_s=0.3)
        job = a_job()
        request = encode_request(GenerationRequest(model="tiny", seed=5, class_label=3))
        await jobs.accepted(job, JOB, request, "A")
        assert await jobs.claim(job.id, "B") is None  # A holds it
        assert await jobs.orphans() == []
        await asyncio.sleep(0.4)  # A stops renewing: its lease lapses
        assert await jobs.orphans() == [(job.id, "tiny")]
        # found past the first page too (live holders' jobs ahead of it)
        live = RedisJobs(redis_url, "t1", lease_s=30)
        others = [a_job() for _ in range(5)]
        for other in others:
            other.created = job.created - 1
            await live.accepted(other, JOB, request, "live")
        assert await jobs.orphans(page=2) == [(job.id, "tiny")]
        for other in others:
            await live.forget(other.id)
        await live.close()
        claimed = await jobs.claim(job.id, "B")
        assert claimed is not None and claimed.attempts == 1 and claimed.request == request
        assert claimed.owner == "k1" and claimed.created == job.created
        assert await jobs.claim(job.id, "C") is None  # B holds it now
        # A's run ends late: it is not the result (B's run is)
        job.finish(JobStatus.succeeded, None, ImageResult([b"A-png"], [5], {"steps": 4}))
        assert await jobs.ended(job, "A", keep_s=60) == -1
        again = a_job()
        again.id = job.id
        again.finish(
            JobStatus.succeeded, None, ImageResult([b"\x89PNG-0", b"\x00\xffPNG-1"], [5, 6], {"steps": 4})
        )
        assert await jobs.ended(again, "B", keep_s=60) == 1
        assert await jobs.ended(again, "B", keep_s=60) == 0  # a second end changes nothing
        assert await jobs.ended(job, "A", keep_s=60) == 0
        stored = await jobs.get(job.id)
        assert stored is not None and stored.status == "succeeded"
        assert stored.pngs == [b"\x89PNG-0", b"\x00\xffPNG-1"] and stored.result == {
            "seeds": [5, 6],
            "parameters": {"steps": 4},
        }
        ttl = await jobs.client.pttl(jobs.job_key(job.id))
        assert 0 < ttl <= 60_000
        assert not await jobs.client.exists(jobs.lease_key(job.id))
        assert await jobs.client.zcard(jobs.unfinished_key) == 0
        await jobs.forget(job.id)
        assert await jobs.get(job.id) is None
        await jobs.close()

    asyncio.run(scenario())


def test_a_slow_holder_keeps_its_job_and_a_stopped_one_loses_it(redis_url: str) -> None:
    """A's job runs for three leases while A's heartbeat renews it: B scans all along and takes nothing.
    Then A stops (no heartbeat): B takes the job over within a lease and a scan, with the stored
    request; A's late end is not recorded, B's is, and the end listener hears it once."""
    lease = 0.4

    async def scenario() -> None:
        a = RedisJournal(redis_url, "t2", lease)
        b = RedisJournal(redis_url, "t2", lease)
        heard: list[str] = []
        a.listeners.append(lambda event, _: heard.append(f"A:{event.job.id}"))
        b.listeners.append(lambda event, _: heard.append(f"B:{event.job.id}"))
        request = GenerationRequest(model="tiny", seed=[11, 12], class_label=4, n=2)
        job = a_job()
        await a.accepted(job, request, JOB)

        async def beat(journal: RedisJournal, until: float) -> None:
            while time.monotonic() < until:
                assert await journal.heartbeat() == []
                await asyncio.sleep(lease / 4)

        t0 = time.monotonic()
        beating = asyncio.create_task(beat(a, t0 + 3 * lease))
        while not beating.done():
            restored = await b.takeover({"tiny"}, max_attempts=3, timeout_s=30)
            assert restored.replay == [] and restored.finished == []
            await asyncio.sleep(0.05)
        await beating
        # A stopped: B gets the job once its lease lapses
        t1 = time.monotonic()
        while True:
            restored = await b.takeover({"tiny"}, max_attempts=3, timeout_s=30)
            if restored.replay:
                break
            assert time.monotonic() - t1 < lease + 0.5, "B did not take the job over"
            await asyncio.sleep(0.05)
        took = time.monotonic() - t1
        [(moved, replayed)] = restored.replay
        assert moved.id == job.id and moved.owner == "k1" and replayed == request
        assert await b.takeover({"tiny"}, max_attempts=3, timeout_s=30) == type(restored)([], [])
        lost = await a.heartbeat()  # A comes back: its job is B's now
        assert [j.id for j in lost] == [job.id]
        job.finish(JobStatus.succeeded, None, ImageResult([b"a"], [11, 12], {}))
        await a.ended(TerminalEvent(job, request, JOB))
        a.dropped(job)  # A lets its copy go: B's record stays
        await asyncio.sleep(0.05)
        assert await b.redis.get(job.id) is not None
        moved.finish(JobStatus.succeeded, None, ImageResult([b"b1", b"b2"], [11, 12], {}))
        await b.ended(TerminalEvent(moved, replayed, JOB))
        assert heard == [f"B:{job.id}"]
        stored = await b.redis.get(job.id)
        assert stored is not None and stored.pngs == [b"b1", b"b2"]
        print(f"taken over {took:.2f} s after the holder's last renewal window (lease {lease} s)")
        for journal in (a, b):
            await journal.close()

    asyncio.run(scenario())


def test_replays_are_bounded(redis_url: str) -> None:
    """A job whose holders keep dying is failed after KDIFF_REPLAY_ATTEMPTS takeovers, naming why."""

    async def scenario() -> None:
        journal = RedisJournal(redis_url, "t3", 0.2)
        job = a_job()
        await journal.accepted(job, GenerationRequest(model="tiny", seed=1), JOB)
        journal._held.clear()  # this holder "dies" every time
        for attempt in range(1, 4):
            await asyncio.sleep(0.3)
            restored = await journal.takeover({"tiny"}, max_attempts=2, timeout_s=30)
            journal._held.clear()
            if attempt <= 2:
                assert [j.id for j, _ in restored.replay] == [job.id]
        assert restored.replay == [] and [j.id for j in restored.finished] == [job.id]
        stored = await journal.redis.get(job.id)
        assert (
            stored is not None
            and stored.status == "failed"
            and "KDIFF_REPLAY_ATTEMPTS=2" in (stored.error_message or "")
        )
        await journal.close(timeout_s=0.1)  # the replayed copies never ran (no service here)

    asyncio.run(scenario())


def test_a_result_is_read_through_another_replica(redis_url: str, tiny_store: Path) -> None:
    """Two services on one Redis (as two engine replicas): a job run by the first is read, with its
    images and its owner's key, from the second, which never ran it."""
    settings: dict[str, Any] = {
        **ENGINE_SETTINGS,
        "model_store": tiny_store,
        "api_keys": "alice,bob",
        "redis_url": redis_url,
        "redis_prefix": "t4",
        "redis_lease_s": 2,
    }
    alice, bob = {"Authorization": "Bearer alice"}, {"Authorization": "Bearer bob"}
    with (
        TestClient(create_app(Settings(**settings))) as one,
        TestClient(create_app(Settings(**settings))) as two,
    ):
        r = one.post(
            "/jobs",
            json={"sampler": "dpmpp_2m", "steps": 5, "seed": 9, "class_label": 2, "n": 2},
            headers=alice,
        )
        assert r.status_code == 202, r.text
        jid = r.json()["id"]
        for _ in range(400):
            view = one.get(f"/jobs/{jid}", headers=alice).json()
            if view["status"] == "succeeded":
                break
            time.sleep(0.02)
        assert view["status"] == "succeeded", view
        other = two.get(f"/jobs/{jid}", headers=alice)
        assert other.status_code == 200, other.text
        assert other.json()["result"]["images"] == view["result"]["images"]
        assert other.json()["result"]["seeds"] == view["result"]["seeds"] == [9, 10]
        image = two.get(f"/jobs/{jid}/images/1", headers=alice)
        assert image.status_code == 200 and image.content == base64.b64decode(view["result"]["images"][1])
        assert two.get(f"/jobs/{jid}", headers=bob).status_code == 404  # keys still isolate jobs
        assert two.get(f"/jobs/{'0' * 32}", headers=alice).status_code == 404


def test_an_unreachable_redis_stops_the_start_naming_the_setting(tiny_store: Path) -> None:
    settings = Settings(model_store=tiny_store, **ENGINE_SETTINGS, redis_url="redis://127.0.0.1:1/0")
    with pytest.raises(RuntimeError, match="KDIFF_REDIS_URL.*does not answer"):
        with TestClient(create_app(settings)):
            pass


def test_a_slow_engine_keeps_its_job(
    redis_url: str, tiny_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Service level, lease 0.5 s: every model call of replica one takes 1.5 s (three leases) while
    replica two scans for orphans all along. The job stays one's (its heartbeat runs on the event
    loop, the model call in the worker thread): it is never taken over, and its images are a normal
    run's."""
    from service.engine.runner import ModelRunner

    settings: dict[str, Any] = {
        **ENGINE_SETTINGS,
        "model_store": tiny_store,
        "redis_url": redis_url,
        "redis_prefix": "t5",
        "redis_lease_s": 0.5,
    }
    body = {"sampler": "euler", "steps": 2, "seed": 21, "class_label": 6}
    with (
        TestClient(create_app(Settings(**settings))) as one,
        TestClient(create_app(Settings(**settings))) as two,
    ):
        want = one.post("/sample", json=body).json()["images"]
        denoise = ModelRunner.denoise

        def slow(self: ModelRunner, *args: Any, **kwargs: Any) -> Any:
            time.sleep(1.5)
            return denoise(self, *args, **kwargs)

        monkeypatch.setattr(ModelRunner, "denoise", slow)
        jid = one.post("/jobs", json=body).json()["id"]
        t0 = time.monotonic()
        for _ in range(400):
            view = one.get(f"/jobs/{jid}").json()
            if view["status"] not in ("queued", "running"):
                break
            time.sleep(0.05)
        took = time.monotonic() - t0
        assert view["status"] == "succeeded" and view["result"]["images"] == want, view
        assert took > 3 * 0.5, took  # it did outlast several leases
        journal = one.app.state.service.journal
        assert journal.redis is not None
        stored = asyncio.run(_attempts(redis_url, "t5", jid))
        assert stored == b"0"  # never taken over
        assert two.app.state.service.jobs.get(jid) is None  # replica two never ran it
        print(f"a job of {took:.1f} s under a 0.5 s lease stayed with its engine")


async def _attempts(url: str, prefix: str, job_id: str) -> Any:
    jobs = RedisJobs(url, prefix, 1.0)
    try:
        return await jobs.client.hget(jobs.job_key(job_id), "attempts")
    finally:
        await jobs.close()

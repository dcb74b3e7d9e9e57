"""The job store's own cost (KDIFF_STATE_DIR), apart from the HTTP service and the model.

Records N jobs the way the service does (accepted: the request as JSON; ended: status, result PNGs
as content-addressed files), ``--concurrency`` at a time from an event loop, and reports jobs/s and
the CPU time per job of the whole process (writer thread included). With a real server's throughput
(docs/BENCHMARKS.md, "Durable jobs") this says what share of a core durability takes.

    python bench/bench_jobstore.py --jobs 2000 --concurrency 32 --png-bytes 1200
    python bench/bench_jobstore.py --redis redis://127.0.0.1:6379/0   # the shared store (KDIFF_REDIS_URL)

With ``--redis`` the store is the Redis one (``/jobs`` only: synchronous requests are not stored there);
besides this process's CPU it reports the Redis server's (``INFO cpu``) per job.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.engine import ImageResult, Job, JobStatus  # noqa: E402
from service.serving.jobstore import JOB, SYNC, Journal, RedisJournal, placeholder  # noqa: E402
from service.serving.request import GenerationRequest  # noqa: E402


async def run(
    folder: Path, jobs: int, concurrency: int, png_bytes: int, kind: str, redis_url: str = ""
) -> dict[str, float]:
    journal = RedisJournal(redis_url, f"bench{os.getpid()}", 10.0) if redis_url else Journal(folder)
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            job = Job(placeholder(60), "digits")
            request = GenerationRequest(class_label=i % 10, steps=20, seed=i, sampler="euler")
            await journal.accepted(job, request, kind)
            png = os.urandom(png_bytes)  # distinct content: one file per image, as real results are
            job.finish(JobStatus.succeeded, result=ImageResult([png], [i], {"seed": i}))

    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one(i) for i in range(jobs)))
    await journal.close()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"jobs_per_s": round(jobs / wall, 1), "cpu_ms_per_job": round(1000 * cpu / jobs, 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument(
        "--png-bytes", type=int, default=1200, help="one result PNG's size (a digits image: ~1 KB)"
    )
    p.add_argument("--redis", default="", help="a Redis URL: measure the shared store instead")
    a = p.parse_args()
    out = {}
    if a.redis:
        import redis

        server = redis.Redis.from_url(a.redis)

        def server_cpu() -> float:
            info = server.info("cpu")
            return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

        before = server_cpu()
        out[JOB] = asyncio.run(run(Path("."), a.jobs, a.concurrency, a.png_bytes, JOB, a.redis))
        out[JOB]["redis_server_cpu_ms_per_job"] = round(1000 * (server_cpu() - before) / a.jobs, 3)
    else:
        for kind in (JOB, SYNC):
            with tempfile.TemporaryDirectory() as folder:
                out[kind] = asyncio.run(run(Path(folder), a.jobs, a.concurrency, a.png_bytes, kind))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

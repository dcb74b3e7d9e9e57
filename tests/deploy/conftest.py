"""A local Ray cluster started by the tests themselves (small: 2 logical CPUs, no dashboard), with the
kdiff Serve application on it: 2 engine slots over a tiny model store, 2 ingress replicas, and the
Redis job store they share (a redis-server started here, redis_server.py)."""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.tiny_store import make_tiny_store

from .redis_server import redis_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listen_port() -> int:
    """A free port for a listener bound after the Ray cluster starts: outside the kernel's ephemeral
    range (32768+) and Ray's worker ports (10002-19999), where Ray's processes bind their own ports as
    they start and could take it first."""
    for _ in range(200):
        port = random.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


ENGINE_SETTINGS: dict[str, Any] = {"torch_threads": 1, "batch_wait_ms": 0, "max_queue": 64}
KEYS = {"api_keys": "alice,bob", "admin_keys": "root"}  # job ownership must hold across replicas
ALICE = {"Authorization": "Bearer alice"}
LEASE_S = 2.0  # KDIFF_REDIS_LEASE_S of the cluster: a dead engine's jobs move within about 2.5 s


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_store(tmp_path_factory.mktemp("ray_store"))


@pytest.fixture(scope="session")
def cluster(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    try:
        import ray
        from ray import serve
    except ImportError:  # never skipped: `make test` installs the dev extra, which has ray[serve]
        pytest.fail("the Ray Serve tests need ray[serve]: .venv/bin/pip install -e '.[dev]'")

    from service.deploy.ray_serve import APP_NAME, build_app

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=80 * 1024 * 1024,
        logging_level="warning",
        log_to_driver=False,
    )
    port, direct = free_port(), listen_port()
    redis = redis_server(tmp_path_factory.mktemp("redis"))
    redis_url = redis.__enter__()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    args = {
        "engines": 2,
        # the job store the engines share: a dead engine's jobs move to a live one
        "settings": {
            **ENGINE_SETTINGS,
            **KEYS,
            "model_store": str(tiny_store),
            "redis_url": redis_url,
            "redis_lease_s": LEASE_S,
        },
        "engine_cpus": 0.5,
        "engine_max_ongoing_requests": 8,
        "engine_max_queued_requests": 4,
        "ingress_min_replicas": 2,
        "ingress_max_replicas": 2,
        "retry_after_s": 2,
        # the ingress replicas' own listener (the fast path, service/deploy/hop.py); Serve's proxy
        # on ``port`` goes to the same replicas
        "http_port": direct,
        "http_host": "127.0.0.1",
    }
    t0 = time.monotonic()
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{direct}"
    try:
        yield {
            "url": url,
            "serve_url": f"http://127.0.0.1:{port}",
            "store": tiny_store,
            "started_s": time.monotonic() - t0,
            "redis_url": redis_url,
        }
    finally:
        serve.shutdown()
        ray.shutdown()
        redis.__exit__(None, None, None)


@pytest.fixture()
def http(cluster: dict[str, Any]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster["url"], timeout=60, headers=ALICE) as c:
        yield c

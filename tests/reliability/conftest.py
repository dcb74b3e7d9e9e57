"""One real server (uvicorn subprocess, tiny model, two keys and an admin key) for the suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.server import Server
from tests.support.tiny_store import make_tiny_store

from .support import start


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/reliability/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.reliability)


@pytest.fixture(scope="session")
def reliability_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_store(tmp_path_factory.mktemp("reliability-store"))


@pytest.fixture(scope="session")
def server(reliability_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start(reliability_store, tmp_path_factory.mktemp("reliability-log") / "server.log")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def fuzz_server(reliability_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The schemathesis runs' server: small bounds keep each generated request quick (the bounds
    themselves are fuzzed too)."""
    srv = start(
        reliability_store,
        tmp_path_factory.mktemp("fuzz") / "server.log",
        KDIFF_MAX_STEPS="40",
        KDIFF_MAX_IMAGES="4",
        KDIFF_JOB_TIMEOUT_S="20",
    )
    try:
        yield srv
    finally:
        srv.stop()

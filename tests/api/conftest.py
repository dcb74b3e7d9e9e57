from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.settings import Settings
from tests.support.tiny_store import make_tiny_store


@pytest.fixture(scope="session")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_store(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="session")
def make_client(store_root: Path) -> Callable[..., TestClient]:
    def make(**overrides: Any) -> TestClient:
        overrides.setdefault("torch_threads", 1)
        overrides.setdefault("batch_wait_ms", 0)
        return TestClient(create_app(Settings(model_store=store_root, **overrides)))

    return make


@pytest.fixture(scope="session")
def client(make_client: Callable[..., TestClient]) -> Iterator[TestClient]:
    with make_client() as c:
        yield c

"""An in-process client of the whole app over a model store (FastAPI's TestClient: lifespan run, models
loaded through the real loading code), for the HTTP tests of one module."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient


@contextmanager
def app_client(model_store: Path, batch_wait_ms: int, **settings: Any) -> Iterator[TestClient]:
    """The app on ``model_store`` with one torch thread and the given batching wait (the tests that
    check requests share calls need a wait long enough for their concurrent requests to meet)."""
    from service.api.app import create_app
    from service.api.settings import Settings

    app = create_app(
        Settings(model_store=model_store, torch_threads=1, batch_wait_ms=batch_wait_ms, **settings)
    )
    with TestClient(app) as client:
        yield client

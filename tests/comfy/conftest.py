"""A Service (digits + a tiny SD 1.x model) and a Comfy on it, per test, in its own event loop."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from PIL import Image

from service.api.settings import Settings
from service.comfy import Comfy
from service.serving.service import Service
from tests.support.sd_tiny import digits_and_tiny_sd_store

T = TypeVar("T")


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return digits_and_tiny_sd_store(tmp_path_factory.mktemp("comfy-store"))


@contextlib.asynccontextmanager
async def comfy_on(store: Path, **settings: Any) -> AsyncIterator[Comfy]:
    service = Service(
        Settings(model_store=store, torch_threads=1, batch_wait_ms=0, **({"models": ["digits"]} | settings))
    )
    await service.startup()
    try:
        yield Comfy(service)
    finally:
        await service.shutdown()


def run(store: Path, scenario: Callable[[Comfy], Awaitable[T]], **settings: Any) -> T:
    async def main() -> T:
        async with comfy_on(store, **settings) as comfy:
            return await asyncio.wait_for(scenario(comfy), 240)

    return asyncio.run(main())


def pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as img:
        return np.asarray(img.convert("RGB"))

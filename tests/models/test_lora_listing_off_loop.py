"""GET /loras and A1111's /sdapi/v1/loras list the store's LoRA folders (a directory listing and a stat
per file, thousands on a network mount) in a worker thread, never on the event loop."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.models.lora import LoraIndex
from tests.support.tiny_store import make_tiny_store


def test_lora_listings_scan_off_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.api.app import create_app
    from service.api.settings import Settings

    root = make_tiny_store(tmp_path / "store")
    (root / "loras").mkdir()
    (root / "loras" / "a.safetensors").write_bytes(b"listed by name, not read")
    on_loop: list[bool] = []
    scan = LoraIndex.scan

    def watched(self: LoraIndex) -> list:  # type: ignore[type-arg]
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # no loop in this thread: a worker
            on_loop.append(False)
        return scan(self)

    monkeypatch.setattr(LoraIndex, "scan", watched)
    with TestClient(create_app(Settings(model_store=root, torch_threads=1))) as c:
        ours, a1111 = c.get("/loras"), c.get("/sdapi/v1/loras")
    assert ours.status_code == a1111.status_code == 200
    assert [i["name"] for i in ours.json()["loras"]] == ["a"] and a1111.json()[0]["name"] == "a"
    assert on_loop and not any(on_loop), on_loop

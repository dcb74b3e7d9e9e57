"""Reading a job's Server-Sent Events in tests (TestClient or httpx.Client, both have ``stream``)."""

from __future__ import annotations

import json
from typing import Any

TERMINAL = ("done", "error", "cancelled")


def sse_events(client: Any, url: str) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) of every event on ``url`` up to the job's last one (done, error or cancelled)."""
    out: list[tuple[str, dict[str, Any]]] = []
    event = None
    with client.stream("GET", url) as r:
        assert r.headers["content-type"].startswith("text/event-stream"), r.headers
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event:
                out.append((event, json.loads(line[6:])))
                if event in TERMINAL:
                    break
    return out

"""Helpers of the reliability suite: a real server, its memory, raw sockets, and the suite's scale."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from tests.support.server import Server

# `make soak` sets KDIFF_SOAK=1: the full version (more requests, higher concurrency).
SOAK = os.environ.get("KDIFF_SOAK") == "1"

KEY1, KEY2, ADMIN = "key-one", "key-two", "admin-key"
AUTH1 = {"Authorization": f"Bearer {KEY1}"}
AUTH2 = {"Authorization": f"Bearer {KEY2}"}
AUTH_ADMIN = {"Authorization": f"Bearer {ADMIN}"}

# The A1111 and OpenAI routes (their own fuzz run: test_fuzz_frontends.py).
FRONTENDS = r"^/(sdapi/v1|v1)/"

# What a server with Python's default error handling writes when a request escapes the app.
CRASH_MARKERS = ("Exception in ASGI application", "Traceback (most recent call last)")


def rss_mib(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def start(store: Path, log: Path, **env: str) -> Server:
    settings = {
        "KDIFF_API_KEYS": f"{KEY1},{KEY2}",
        "KDIFF_ADMIN_KEYS": ADMIN,
        "KDIFF_MAX_QUEUE": "1000",
        **env,
    }
    srv = Server(store, log, **settings)
    srv.wait_ready()
    return srv


def crashes(server: Server) -> list[str]:
    """Lines of the server log that show an exception escaping the app."""
    return [
        line for line in server.log_path.read_text().splitlines() if any(m in line for m in CRASH_MARKERS)
    ]


def raw_request(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes, return everything the server answers until it closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before taking the whole body: read its answer
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and b"content-length" not in b"".join(chunks).lower():
                    break
        except (TimeoutError, ConnectionResetError):
            pass
        return b"".join(chunks)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else -1


def schema_types(spec: dict[str, Any]) -> set[str]:
    """The JSON types a property accepts, with array items as 'array:<type>' and objects as 'object'."""
    out: set[str] = set()
    for alt in spec.get("anyOf", [spec]):
        kind = alt.get("type")
        if kind == "array":
            out.add(f"array:{alt.get('items', {}).get('type')}")
        elif kind == "object":
            out.add("object")
        elif kind is not None:
            out.add(kind)
        extra = alt.get("additionalProperties")  # a schema, or True for dict[str, Any]
        for sub in extra.get("anyOf", []) if isinstance(extra, dict) else []:
            out.add(f"object:{sub.get('type')}")
    return out

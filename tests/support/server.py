"""Start `kdiff serve` as a real uvicorn subprocess on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(
        self, store: Path, log: Path, port: int | None = None, *, prefix: Sequence[str] = (), **env: str
    ) -> None:
        """``prefix``: what the command runs under (e.g. ``setpriv`` to serve as another user)."""
        self.port = port or free_port()  # a port: a restart where the last one ran
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {
            **os.environ,
            "KDIFF_MODEL_STORE": str(store),
            "KDIFF_TORCH_THREADS": "1",
            "KDIFF_BATCH_WAIT_MS": "0",
            **env,
        }
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        cmd = [
            *prefix,
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)
        self.log_path = log

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready: {self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@contextmanager
def running(store: Path, log: Path, *, prefix: Sequence[str] = (), **env: str) -> Iterator[Server]:
    """A ready server on ``store`` for the ``with`` block, killed after it."""
    server = Server(store, log, prefix=prefix, **env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()

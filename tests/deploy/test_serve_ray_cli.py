"""`kdiff serve --ray` as a real process beside a `ray start` cluster that RAY_ADDRESS points to: without
--address it starts (and on SIGTERM stops) a cluster of its own and leaves the other one alone."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.server import REPO

from .conftest import free_port, listen_port

pytestmark = pytest.mark.timeout(300)


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_serve_ray_without_address_owns_its_cluster_even_with_ray_address_set(
    tiny_store: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    head_port = free_port()
    temp = Path(f"/tmp/kr{os.getpid()}")  # short: Ray's socket paths live under it
    ray_bin = Path(sys.executable).parent / "ray"
    head_cmd = [str(ray_bin), "start", "--head", "--block", f"--port={head_port}", "--num-cpus=1"]
    head_cmd += ["--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats"]
    head = subprocess.Popen(head_cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kdiff = None
    try:
        wait_for(lambda: listening(head_port), 90, "the `ray start` cluster")
        port = listen_port()  # the ingress replica's own listener binds it once the cluster runs
        log = tmp_path / "kdiff.log"
        kenv = {
            **env,
            "RAY_ADDRESS": f"127.0.0.1:{head_port}",  # what an operator's shell may well have exported
            "KDIFF_MODEL_STORE": str(tiny_store),
            "KDIFF_TORCH_THREADS": "1",
        }
        cmd = [sys.executable, "-m", "service.cli", "serve", "--ray", "--port", str(port)]
        with open(log, "wb") as out:
            kdiff = subprocess.Popen(cmd, cwd=REPO, env=kenv, stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: ready(url) or kdiff.poll() is not None, 180, "kdiff serve --ray")
        assert kdiff.poll() is None, log.read_text()[-3000:]
        r = httpx.post(f"{url}/sample", json={"class_label": 1, "steps": 2}, timeout=60)
        assert r.status_code == 200, r.text
        line = r"on its own Ray cluster; gcs=[\d.]+:(\d+)"
        # printed when serve.run returns, which can be a moment after the proxy already answers
        wait_for(lambda: re.search(line, log.read_text()) is not None, 60, "the start-up line")
        m = re.search(line, log.read_text())
        assert m is not None, log.read_text()[-3000:]
        own_port = int(m.group(1))
        assert own_port != head_port and listening(own_port)

        kdiff.send_signal(signal.SIGTERM)
        assert kdiff.wait(120) == 0, log.read_text()[-3000:]
        wait_for(lambda: not listening(own_port), 30, "its own cluster to stop")
        assert head.poll() is None and listening(head_port), "the `ray start` cluster must be left running"
    finally:
        if kdiff is not None and kdiff.poll() is None:
            kdiff.kill()
            kdiff.wait(30)
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp, ignore_errors=True)


def test_serve_ray_refuses_a_port_another_server_holds(tmp_path: Path) -> None:
    """The ingress's listener binds with SO_REUSEPORT, which the kernel would let a second ``kdiff serve
    --ray`` (or a stale one) share with the first, connections split between two apps. It is refused at
    start instead, as plain ``kdiff serve`` is, also when the holder itself uses SO_REUSEPORT."""
    for reuse in (False, True):
        port = listen_port()
        with socket.socket() as holder:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse:
                holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            holder.bind(("127.0.0.1", port))
            holder.listen()
            cmd = [sys.executable, "-m", "service.cli", "serve", "--ray", "--port", str(port)]
            env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "KDIFF_MODEL_STORE": str(tmp_path)}
            run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
        assert f"127.0.0.1:{port} is in use" in run.stdout, run.stdout

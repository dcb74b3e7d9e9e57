"""End to end: the real server (uvicorn subprocess) over loopback HTTP with httpx."""

from __future__ import annotations

import io
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from service.images import read_parameters
from tests.support.server import Server
from tests.support.sse import sse_events
from tests.support.tiny_store import make_tiny_store

# Jobs that must still be running when the test acts on them: the traced tiny model takes about a
# millisecond per call, so 500 steps can finish inside the half-second a client waits.
LONG = 10_000


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_store(tmp_path_factory.mktemp("e2e-store"))


@pytest.fixture(scope="module")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(
        store,
        tmp_path_factory.mktemp("log") / "server.log",
        KDIFF_MAX_BATCH_ROWS="4",
        KDIFF_MAX_QUEUE="2",
        KDIFF_MAX_STEPS=str(LONG),
    )
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture()
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def _wait_status(http: httpx.Client, job_id: str, want: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = http.get(f"/jobs/{job_id}").json()
        if view["status"] == want:
            return view
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never became {want}: {view}")


def test_sample_json_and_png(http: httpx.Client) -> None:
    r = http.post("/sample", json={"class_label": 7, "steps": 5, "seed": 11})
    assert r.status_code == 200 and r.json()["seeds"] == [11]
    png = http.post(
        "/sample", json={"class_label": 7, "steps": 5, "seed": 11}, headers={"Accept": "image/png"}
    )
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (8, 8)
    assert read_parameters(png.content)["class_label"] == 7


def test_job_followed_over_sse_to_the_end(http: httpx.Client) -> None:
    job_id = http.post("/jobs", json={"steps": 12, "seed": 5, "sampler": "euler_ancestral"}).json()["id"]
    events = sse_events(http, f"/jobs/{job_id}/events")
    assert events[-1][0] == "done" and events[-1][1]["seeds"] == [5]
    progress = [d["step"] for n, d in events if n == "progress"]
    assert progress and progress == sorted(progress) and progress[-1] <= 12


def test_delete_and_disconnect_cancel(http: httpx.Client, server: Server) -> None:
    job_id = http.post("/jobs", json={"steps": LONG}).json()["id"]
    _wait_status(http, job_id, "running")
    assert http.delete(f"/jobs/{job_id}").json()["status"] == "cancelled"
    # a synchronous client that gives up cancels its job (keep=true: still listed once it has left)
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=server.url, timeout=0.5) as impatient:
        impatient.post("/sample?keep=true", json={"steps": LONG, "seed": 999})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        jobs = http.get("/jobs", params={"status": "cancelled"}).json()
        if len(jobs) >= 2:
            break
        time.sleep(0.05)
    assert len(jobs) >= 2, jobs


def _count(metrics: str, status: str) -> float:
    prefix = f'kdiff_http_requests_total{{method="POST",route="/sample",status="{status}"}} '
    return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(prefix))


def test_a_client_that_leaves_while_queued_counts_as_499(http: httpx.Client, server: Server) -> None:
    before = http.get("/metrics").text
    busy = [http.post("/jobs", json={"steps": LONG, "n": 2}).json()["id"] for _ in range(2)]  # 4 rows: full
    for job_id in busy:
        _wait_status(http, job_id, "running")
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=server.url, timeout=0.5) as impatient:
        impatient.post("/sample", json={"steps": 2, "seed": 5})  # queued behind them, then gone
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _count(http.get("/metrics").text, "499") == _count(before, "499"):
        time.sleep(0.05)
    after = http.get("/metrics").text
    for job_id in busy:
        http.delete(f"/jobs/{job_id}")
    assert _count(after, "499") == _count(before, "499") + 1
    assert _count(after, "409") == _count(before, "409"), "no client received a 409"


def test_bad_input_is_422(http: httpx.Client) -> None:
    r = http.post("/sample", json={"sampler": "warp_drive"})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "sampler"] and "euler" in r.json()["detail"][0]["allowed"]


def test_full_queue_is_429(http: httpx.Client) -> None:
    ids = []
    status = None
    for _ in range(6):  # 4 rows run (max_batch_rows=4), 2 jobs queue (max_queue=2), then 429
        r = http.post("/jobs", json={"steps": LONG, "n": 2})
        status = r.status_code
        if status == 429:
            assert int(r.headers["retry-after"]) >= 1
            break
        ids.append(r.json()["id"])
    for job_id in ids:
        http.delete(f"/jobs/{job_id}")
    assert status == 429 and len(ids) >= 3


def test_sigterm_drains_running_jobs_then_exits(store: Path, tmp_path: Path) -> None:
    srv = Server(store, tmp_path / "drain.log", KDIFF_DRAIN_TIMEOUT_S="30", KDIFF_MAX_STEPS="3000")
    try:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, timeout=10) as http, httpx.Client(base_url=srv.url) as other:
            # long enough (seconds) to be still running while the test checks /readyz
            job_id = http.post("/jobs", json={"steps": 3000}).json()["id"]
            events = []
            with http.stream("GET", f"/jobs/{job_id}/events") as r:
                for line in r.iter_lines():
                    if not line.startswith("event: "):
                        continue
                    events.append(line[7:])
                    if events == ["progress"] or events == ["queued", "progress"]:
                        srv.proc.send_signal(signal.SIGTERM)
                        time.sleep(0.2)
                        assert other.get("/readyz").status_code == 503
                        assert other.post("/jobs", json={"steps": 2}).status_code == 503
        assert events[-1] == "done"  # the running job finished during the drain
        assert srv.proc.wait(30) == 0
    finally:
        srv.stop()

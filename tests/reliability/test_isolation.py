"""Jobs belong to the key that made them: another key gets 404 on every job route (the id's existence
is not confirmed), an admin key sees all; which routes need a key at all."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.support.server import Server

from .support import AUTH1, AUTH2, AUTH_ADMIN

LONG = {"class_label": 1, "steps": 400, "n": 1, "seed": 3}


def _job(server: Server, headers: dict[str, str], body: dict) -> str:
    r = httpx.post(f"{server.url}/jobs", json=body, headers=headers, timeout=30)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _wait(server: Server, job_id: str, headers: dict[str, str]) -> dict:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        view = httpx.get(f"{server.url}/jobs/{job_id}", headers=headers, timeout=30).json()
        if view["status"] in ("succeeded", "failed", "cancelled"):
            return view
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def test_another_key_cannot_see_list_stream_download_or_cancel_a_job(server: Server) -> None:
    done = _job(server, AUTH1, {"class_label": 2, "steps": 2, "seed": 1})
    assert _wait(server, done, AUTH1)["status"] == "succeeded"
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for path in (f"/jobs/{done}", f"/jobs/{done}/events", f"/jobs/{done}/images/0"):
            r = c.get(path, headers=AUTH2)
            assert r.status_code == 404, (path, r.status_code, r.text)
            assert r.json()["detail"] == c.get(f"/jobs/{'0' * 32}", headers=AUTH2).json()["detail"].replace(
                "0" * 32, done
            ), "the 404 for another key's job must read like the one for a missing job"
        assert done not in [j["id"] for j in c.get("/jobs", headers=AUTH2).json()]
        assert done in [j["id"] for j in c.get("/jobs", headers=AUTH1).json()]
        assert c.get(f"/jobs/{done}/images/0", headers=AUTH1).headers["content-type"] == "image/png"
        # cancelling someone else's running job: 404, and the job runs on
        running = _job(server, AUTH1, LONG)
        assert c.delete(f"/jobs/{running}", headers=AUTH2).status_code == 404
        assert c.get(f"/jobs/{running}", headers=AUTH1).json()["status"] in ("queued", "running", "succeeded")
        # the admin key sees both keys' jobs and may cancel them
        other = _job(server, AUTH2, {"class_label": 4, "steps": 2, "seed": 2})
        ids = [j["id"] for j in c.get("/jobs?limit=1000", headers=AUTH_ADMIN).json()]
        assert {done, running, other} <= set(ids)
        assert c.get(f"/jobs/{other}", headers=AUTH_ADMIN).status_code == 200
        assert c.delete(f"/jobs/{running}", headers=AUTH_ADMIN).json()["status"] in ("cancelled", "succeeded")


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/docs", "/redoc", "/openapi.json"])
def test_probes_and_docs_are_open(server: Server, path: str) -> None:
    assert httpx.get(f"{server.url}{path}", timeout=30).status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/models"),
        ("GET", "/samplers"),
        ("GET", "/schedules"),
        ("GET", "/jobs"),
        ("POST", "/jobs"),
        ("POST", "/sample"),
        ("GET", "/upscalers"),
        ("POST", "/upscale"),
        ("GET", f"/jobs/{'a' * 32}"),
        ("DELETE", f"/jobs/{'a' * 32}"),
        ("GET", f"/jobs/{'a' * 32}/events"),
        # ComfyUI's routes (service/api/comfy), bare and under /api/
        ("POST", "/prompt"),
        ("GET", "/api/history"),
        ("GET", "/view?filename=x.png"),
        ("POST", "/api/upload/image"),
        ("POST", "/upload/mask"),
        ("POST", "/interrupt"),
        ("GET", "/object_info"),
        ("GET", "/system_stats"),
    ],
)
def test_the_api_needs_a_key(server: Server, method: str, path: str) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic bm9wZTpub3Bl"}):
        r = httpx.request(method, f"{server.url}{path}", headers=headers, json={}, timeout=30)
        assert r.status_code == 401, (method, path, headers, r.status_code)
        assert "Bearer" in r.headers["www-authenticate"]

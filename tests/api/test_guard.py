"""The gate before the routes: keys (Bearer and Basic), which routes are open, body limits."""

from __future__ import annotations

import base64
from collections.abc import Callable

from fastapi.testclient import TestClient


def _basic(user_pass: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(user_pass.encode()).decode()}


def test_basic_credentials_match_user_pass_entries(make_client: Callable[..., TestClient]) -> None:
    with make_client(api_keys="alice:wonder,plain-key") as c:
        assert c.post("/sample", json={"steps": 1}, headers=_basic("alice:wonder")).status_code == 200
        assert c.post("/sample", json={"steps": 1}, headers=_basic("alice:wrong")).status_code == 401
        assert c.get("/samplers", headers={"Authorization": "Bearer plain-key"}).status_code == 200
        assert c.get("/samplers", headers={"Authorization": "Basic %%%"}).status_code == 401


def test_docs_can_be_closed_and_probes_stay_open(make_client: Callable[..., TestClient]) -> None:
    with make_client(api_keys="k", public_docs=False) as c:
        for path in ("/docs", "/redoc", "/openapi.json", "/models", "/samplers"):
            assert c.get(path).status_code == 401, path
        for path in ("/healthz", "/readyz", "/metrics"):
            assert c.get(path).status_code == 200, path
        assert c.get("/openapi.json", headers={"Authorization": "Bearer k"}).status_code == 200
    with make_client(api_keys="k") as c:  # the default: docs open
        assert c.get("/openapi.json").status_code == 200


def test_admin_keys_see_every_job_and_keys_see_their_own(make_client: Callable[..., TestClient]) -> None:
    with make_client(api_keys="a,b", admin_keys="root") as c:
        mine = c.post("/jobs", json={"steps": 1}, headers={"Authorization": "Bearer a"}).json()["id"]
        assert c.get(f"/jobs/{mine}", headers={"Authorization": "Bearer b"}).status_code == 404
        assert c.get(f"/jobs/{mine}", headers={"Authorization": "Bearer a"}).status_code == 200
        assert c.get(f"/jobs/{mine}", headers={"Authorization": "Bearer root"}).status_code == 200
        assert [j["id"] for j in c.get("/jobs", headers={"Authorization": "Bearer b"}).json()] == []


def test_a_body_over_the_limit_is_413_before_validation(make_client: Callable[..., TestClient]) -> None:
    with make_client(max_body_bytes=2048) as c:
        r = c.post("/sample", json={"prompt": "x" * 4000})
        assert r.status_code == 413 and "KDIFF_MAX_BODY_BYTES" in r.json()["detail"]

        def chunks():  # no Content-Length: refused as the stream passes the limit
            for _ in range(8):
                yield b" " * 1024

        r = c.post("/sample", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        assert c.post("/sample", json={"steps": 1}).status_code == 200


def test_a_body_of_too_many_json_values_is_413_as_it_arrives(make_client: Callable[..., TestClient]) -> None:
    """8 MB of `[[0]],` took seconds of the event loop to parse and walk: brackets and commas are
    counted as the body arrives and a body past the count is refused, in each route's own shape."""
    from service.api.guard import MAX_BODY_TOKENS

    many = ("[" + ",".join(["[0]"] * (MAX_BODY_TOKENS // 2)) + "]").encode()
    body = b'{"steps": 1, "zzz": ' + many + b"}"
    with make_client() as c:
        for path, detail in (
            ("/sample", lambda j: j["detail"]),
            ("/sdapi/v1/options", lambda j: j["detail"]),
            ("/v1/images/generations", lambda j: j["error"]["message"]),
            ("/prompt", lambda j: j["detail"]),  # the body limit's shape there, as for its byte limit
        ):
            r = c.post(path, content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 413, (path, r.text[:300])
            assert f"over {MAX_BODY_TOKENS} JSON arrays" in detail(r.json()), (path, r.text[:300])
        fine = {"steps": 1, "prompt": "a, b, c " * 400, "styles": [], "override_settings": {}}  # 800 commas
        r = c.post("/sdapi/v1/txt2img", json=fine)
        assert r.status_code == 200, r.text[:300]


def test_a_body_that_cannot_be_parsed_says_why(client: TestClient) -> None:
    """FastAPI's bare "There was an error parsing the body" named nothing: a compressed body, an
    integer of over 4,300 digits and deep nesting each get a reason, in the routes' 422 item shape."""
    import gzip

    cases = {
        gzip.compress(b'{"steps": 1}'): "not UTF-8 JSON",
        b'{"seed": ' + b"9" * 5000 + b"}": "4300 digits",
        b"[" * 50_000: "nested too deep",
    }
    for path in ("/sample", "/jobs"):
        for body, says in cases.items():
            r = client.post(path, content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (path, r.text[:200])
            (item,) = r.json()["detail"]
            assert item["loc"] == ["body"] and says in item["msg"], (path, item)


def test_a_sync_result_is_dropped_once_delivered_unless_kept(client: TestClient) -> None:
    gone = client.post("/sample", json={"steps": 1}, headers={"Accept": "image/png"})
    assert client.get(f"/jobs/{gone.headers['x-job-id']}").status_code == 404
    kept = client.post("/sample?keep=true", json={"steps": 1}, headers={"Accept": "image/png"})
    view = client.get(f"/jobs/{kept.headers['x-job-id']}").json()
    assert view["status"] == "succeeded" and view["result"]["images"]
    kept = client.post("/sample?keep=true", json={"steps": 1})  # a JSON answer names its job too
    assert kept.headers["x-seeds"] == ",".join(map(str, kept.json()["seeds"]))
    assert client.get(f"/jobs/{kept.headers['x-job-id']}").json()["status"] == "succeeded"


def test_a_job_cut_off_by_shutdown_says_when_to_retry() -> None:
    """RELIABILITY: 503 while draining after SIGTERM comes with Retry-After, for a /sample whose
    job the drain ended as for new work."""
    import pytest
    from fastapi import HTTPException

    from service.api.views import raise_for_failure
    from service.engine import Job, JobStatus
    from service.engine.jobs import JobError
    from service.serving.jobstore import placeholder

    job = Job(placeholder(60.0), "m")
    job.finish(JobStatus.failed, JobError("shutdown", "the service shut down"))
    with pytest.raises(HTTPException) as info:
        raise_for_failure(job)
    assert info.value.status_code == 503 and (info.value.headers or {}).get("Retry-After") == "5"


def test_a_chunked_body_has_the_smaller_chunked_limit(make_client: Callable[..., TestClient]) -> None:
    body = b'{"steps": 1, "prompt": null' + b" " * 6000 + b"}"
    with make_client(max_chunked_bytes=4096) as c:
        sized = c.post("/sample", content=body, headers={"Content-Type": "application/json"})
        assert sized.status_code == 200  # 6 kB with Content-Length: under KDIFF_MAX_BODY_BYTES

        def stream():
            yield body

        r = c.post("/sample", content=stream(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "KDIFF_MAX_CHUNKED_BYTES" in r.json()["detail"]

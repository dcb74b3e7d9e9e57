"""Property-based fuzzing of the whole HTTP API from its own OpenAPI schema (schemathesis): whatever
a client sends that the schema allows (and much it does not), no 5xx, and responses conform to the
schema. A bounded number of examples per operation keeps it in the default run; `make soak` runs more."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import response_schema_conformance

from service.api.app import create_app
from service.api.settings import Settings
from tests.support.server import Server

from .support import AUTH1, SOAK, crashes, start

EXAMPLES = 200 if SOAK else 25


@pytest.fixture(scope="module")
def fuzz_server(reliability_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # small bounds keep each generated request quick; the bounds themselves are fuzzed too
    srv = start(
        reliability_store,
        tmp_path_factory.mktemp("fuzz") / "server.log",
        KDIFF_MAX_STEPS="40",
        KDIFF_MAX_IMAGES="4",
        KDIFF_JOB_TIMEOUT_S="20",
    )
    try:
        yield srv
    finally:
        srv.stop()


# The schema the server publishes at /openapi.json, built without loading a model (nothing loads at
# import or app creation), so schemathesis can parametrize at collection time.
schema = schemathesis.openapi.from_dict(create_app(Settings(model_store=Path("unused"))).openapi())


@schemathesis.check
def no_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """No 5xx, except the documented 504 of a job that missed the deadline its own request set
    (`timeout_s`: a client asking for 5e-324 s gets what it asked for)."""
    body = case.body if isinstance(case.body, dict) else {}
    if response.status_code == 504 and body.get("timeout_s") is not None:
        assert response.json()["detail"]["code"] == "deadline_exceeded"
        return None
    if response.status_code >= 500:
        raise AssertionError(f"{response.status_code}: {response.text[:300]}")
    return None


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same examples every run: a failure here is reproducible
)
def test_api_from_its_schema(case: Any, fuzz_server: Server) -> None:
    case.call_and_validate(
        base_url=fuzz_server.url,
        headers=AUTH1,
        timeout=60,
        checks=[no_server_error, response_schema_conformance],
    )


def test_fuzzing_left_no_crash_in_the_log(fuzz_server: Server) -> None:
    assert crashes(fuzz_server) == []

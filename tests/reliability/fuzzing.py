"""What the two schemathesis runs share (test_fuzz.py: the core API; test_fuzz_frontends.py: the
A1111 and OpenAI routes): the published schema and the no-5xx check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, settings

from service.api.app import create_app
from service.api.settings import Settings


def published_schema() -> Any:
    """The schema the server publishes at /openapi.json, built without loading a model (nothing
    loads at import or app creation), so schemathesis can parametrize at collection time."""
    return schemathesis.openapi.from_dict(create_app(Settings(model_store=Path("unused"))).openapi())


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


def fuzz_settings(examples: int) -> Any:
    """Hypothesis settings of both runs: ``examples`` per operation, the same examples every run
    (a failure is reproducible), no deadline (a request may queue behind another)."""
    return settings(
        max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
    )

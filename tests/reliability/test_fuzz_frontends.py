"""Property-based fuzzing of the A1111 (``/sdapi/v1``) and OpenAI (``/v1``) routes from their OpenAPI
schemas (schemathesis), as test_fuzz.py does for the core API: no 5xx, responses conform to the
schema, and every 4xx comes in that frontend's own error shape (a client parses it as it would
the real A1111's / OpenAI's). A bounded number of examples per operation keeps it in the default
run; `make soak` runs more."""

from __future__ import annotations

from typing import Any

import schemathesis
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.support.server import Server

from .fuzzing import fuzz_settings, no_server_error, published_schema
from .support import AUTH1, FRONTENDS, SOAK, crashes

EXAMPLES = 100 if SOAK else 10


schema = published_schema().include(path_regex=FRONTENDS)


@schemathesis.check
def frontend_error_shape(ctx: Any, response: Any, case: Any) -> bool | None:
    """A1111: ``{"error", "detail", "body", "errors"}``; OpenAI: ``{"error": {"message", "type",
    "param", "code"}}`` (401s come from the key gate, in the core API's shape, before any route)."""
    if not 400 <= response.status_code < 500 or response.status_code in (401, 405, 408, 413):
        return None
    body = response.json()
    if case.path.startswith("/sdapi/"):
        assert {"error", "detail", "body", "errors"} <= body.keys(), body
    else:
        assert {"message", "type", "param", "code"} <= body["error"].keys(), body
    return None


@schema.parametrize()
@fuzz_settings(EXAMPLES)
def test_frontends_from_their_schema(case: Any, fuzz_server: Server) -> None:
    case.call_and_validate(
        base_url=fuzz_server.url,
        headers=AUTH1,
        timeout=60,
        checks=[no_server_error, frontend_error_shape, response_schema_conformance],
    )


def test_fuzzing_left_no_crash_in_the_log(fuzz_server: Server) -> None:
    assert crashes(fuzz_server) == []

"""Property-based fuzzing of the whole HTTP API from its own OpenAPI schema (schemathesis): whatever
a client sends that the schema allows (and much it does not), no 5xx, and responses conform to the
schema. A bounded number of examples per operation keeps it in the default run; `make soak` runs more."""

from __future__ import annotations

from typing import Any

from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.support.server import Server

from .fuzzing import fuzz_settings, no_server_error, published_schema
from .support import AUTH1, FRONTENDS, SOAK, crashes

EXAMPLES = 200 if SOAK else 25


# The A1111 and OpenAI routes have their own run, which also checks their error shapes
# (test_fuzz_frontends.py).
schema = published_schema().exclude(path_regex=FRONTENDS)


@schema.parametrize()
@fuzz_settings(EXAMPLES)
def test_api_from_its_schema(case: Any, fuzz_server: Server) -> None:
    case.call_and_validate(
        base_url=fuzz_server.url,
        headers=AUTH1,
        timeout=60,
        checks=[no_server_error, response_schema_conformance],
    )


def test_fuzzing_left_no_crash_in_the_log(fuzz_server: Server) -> None:
    assert crashes(fuzz_server) == []

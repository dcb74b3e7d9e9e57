"""Every field of the request schema, sent non-finite and out-of-range numbers: always a 422 that names
the field, on a connection that stays usable, with nothing escaping the app (table-driven from the
schema, so a new field is covered without editing this file)."""

from __future__ import annotations

import httpx
import pytest

from service.api.schemas import SampleRequest
from tests.support.server import Server

from .support import AUTH1, crashes, schema_types

NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"]  # Python's json.loads takes them all
OUT_OF_RANGE = {"integer": str(10**30), "number": "-1e30"}


def _cases() -> list[tuple[str, str]]:
    """(field, raw JSON value) for every field of SampleRequest."""
    cases = []
    for field, spec in SampleRequest.model_json_schema()["properties"].items():
        types = schema_types(spec)
        for literal in NON_FINITE:
            if types & {"object", "object:number", "object:integer"}:
                cases.append((field, f'{{"eta": {literal}}}'))
            elif any(t.startswith("array:") for t in types) and not types & {"number", "integer"}:
                cases.append((field, f"[{literal}]"))
            else:
                cases.append((field, literal))
            if types & {"array:number", "array:integer"} and types & {"number", "integer"}:
                cases.append((field, f"[1, {literal}]"))  # inside a list too (seed, class_label)
        for kind, value in OUT_OF_RANGE.items():
            if kind in types:
                cases.append((field, value))
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def http(server: Server) -> httpx.Client:
    # one keep-alive connection for the whole table: a 500 would reset it and fail the next request
    transport = httpx.HTTPTransport(retries=0)
    with httpx.Client(base_url=server.url, headers=AUTH1, timeout=30, transport=transport) as c:
        yield c


def test_the_table_covers_every_field() -> None:
    assert {field for field, _ in CASES} == set(SampleRequest.model_fields)


@pytest.mark.parametrize(("field", "value"), CASES, ids=[f"{f}={v}" for f, v in CASES])
def test_non_finite_and_out_of_range_values_are_422s_naming_the_field(
    http: httpx.Client, field: str, value: str
) -> None:
    body = f'{{"{field}": {value}, "steps": 1}}' if field != "steps" else f'{{"steps": {value}}}'
    r = http.post("/sample", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, (field, value, r.status_code, r.text[:300])
    detail = r.json()["detail"]
    named = [err for err in detail if field in [str(p) for p in err["loc"]]]
    assert named, (field, value, detail)


def test_nothing_escaped_the_app(server: Server, http: httpx.Client) -> None:
    assert http.get("/healthz").status_code == 200
    assert crashes(server) == []

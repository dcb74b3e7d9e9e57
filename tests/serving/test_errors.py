"""One list of error codes: every code the tree writes is an ErrorCode, and each has an HTTP status."""

from __future__ import annotations

import ast
from pathlib import Path

from service.api.errors import STATUS, http_error, status_of
from service.serving.errors import ErrorCode, ModelBusy, ModelUnavailable
from service.serving.pool import Footprint

SERVICE = Path(__file__).resolve().parents[2] / "service"


def _job_error_codes() -> set[str]:
    """The first argument of every ``JobError("...")`` written as a literal in service/."""
    out: set[str] = set()
    for path in SERVICE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", getattr(node.func, "attr", None)) == "JobError"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                out.add(node.args[0].value)
    return out


def test_every_code_the_engine_writes_is_listed() -> None:
    codes = _job_error_codes()
    assert {"invalid_input", "model_error", "non_finite", "shutdown", "deadline_exceeded"} <= codes
    assert codes <= {c.value for c in ErrorCode}


def test_every_code_has_one_http_status() -> None:
    assert set(STATUS) == set(ErrorCode)
    assert status_of("unknown_model") == 404 and status_of("no such code") == 500


def test_memory_errors_carry_codes_and_transience_not_statuses() -> None:
    fp = Footprint(100, {}, {"a": 80})
    try:
        fp.plan_evictions("b", 200, lambda _m: True, ["a"])
    except ModelUnavailable as exc:
        never = exc
    try:
        fp.plan_evictions("b", 50, lambda _m: False, ["a"])  # "a" is busy: room held, retry later
    except ModelUnavailable as exc:
        held = exc
    assert never.code == held.code == ErrorCode.insufficient_memory
    assert not never.transient and held.transient
    assert (http_error(never).status_code, http_error(held).status_code) == (507, 503)
    assert not hasattr(never, "status")
    busy = http_error(ModelBusy("a"))
    assert busy.status_code == 409 and busy.detail["code"] == "busy"

"""One list of error codes (engine/codes.py), one HTTP status for each (api/errors.py); serving errors
carry codes, not statuses."""

from __future__ import annotations

from service.api.errors import STATUS, http_error, status_of
from service.serving.errors import ErrorCode, ModelBusy, ModelUnavailable
from service.serving.pool import Footprint


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

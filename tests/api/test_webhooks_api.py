"""Webhook settings and submit-time checks through the app (no receiver needed)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from service.api.guard import key_id
from service.serving.webhooks.hooks import key_digest, parse_defaults


def test_the_key_digest_is_the_gates() -> None:
    for key in ["key-one", "user:pass", "a=b==", "ключ"]:
        assert key_digest(key) == key_id(key)


def test_default_urls_parse_per_key() -> None:
    got = parse_defaults(["k=1=https://a.example/x?y=1", "*=http://b.example/"])
    assert got == {key_digest("k=1"): "https://a.example/x?y=1", None: "http://b.example/"}
    with pytest.raises(ValueError, match="KDIFF_WEBHOOK_URLS entry"):
        parse_defaults(["no-url-here"])


def test_without_an_allow_list_a_callback_is_refused(make_client: Callable[..., TestClient]) -> None:
    with make_client() as client:
        r = client.post("/jobs", json={"class_label": 1, "callback_url": "https://hooks.example.com/x"})
        assert r.status_code == 422
        (err,) = r.json()["detail"]
        assert err["loc"] == ["body", "callback_url"] and "KDIFF_WEBHOOK_ALLOW" in err["msg"]
        # a job without one shows no webhooks
        job = client.post("/jobs", json={"class_label": 1}).json()["id"]
        assert client.get(f"/jobs/{job}").json()["webhooks"] is None


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://hooks.example.com:8443/", "not allowed"),
        ("https://other.example.com/", "not allowed"),
        ("http://10.1.2.3/", "private"),
        ("gopher://hooks.example.com/", "scheme"),
    ],
)
def test_refused_callbacks_are_422s_naming_the_field(
    make_client: Callable[..., TestClient], url: str, why: str
) -> None:
    with make_client(webhook_allow=["hooks.example.com", "*.example.org", "10.*:*"]) as client:
        for route in ("/jobs", "/sample"):
            r = client.post(route, json={"class_label": 1, "callback_url": url})
            assert r.status_code == 422, r.text
            (err,) = r.json()["detail"]
            assert err["loc"] == ["body", "callback_url"] and why in err["msg"], err


def test_a_refused_default_url_stops_the_start(make_client: Callable[..., TestClient]) -> None:
    with pytest.raises(RuntimeError, match="KDIFF_WEBHOOK_URLS.*refused"):
        make_client(webhook_allow=["*"], webhook_urls=["*=http://169.254.169.254/"])

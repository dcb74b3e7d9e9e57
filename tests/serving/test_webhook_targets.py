"""Webhook targets: the allow list, the SSRF rules (after DNS), the signature, the back-off, the
outbox table."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from pathlib import Path

import pytest

from service.serving.jobstore import StateDB
from service.serving.webhooks import check_url, parse_patterns, signature_header
from service.serving.webhooks.outbox import Attempt, Delivery, MemoryOutbox, StateOutbox
from service.serving.webhooks.sender import backoff_s
from service.serving.webhooks.targets import TargetRefused, refusal, resolve
from tests.support.webhook_receiver import verify

REFUSED = [
    "10.0.0.1", "172.16.5.4", "192.168.1.1", "127.0.0.1", "127.1.2.3", "169.254.169.254", "0.0.0.0",
    "100.64.0.1", "224.0.0.1", "255.255.255.255", "192.0.0.8", "198.18.0.1", "2001:0:4136:e378::1",
    "::1", "::", "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1",
    "::ffff:10.0.0.1", "::ffff:127.0.0.1", "::ffff:169.254.169.254",  # IPv4-mapped
    "64:ff9b::a00:1", "2002:a00:1::1",  # NAT64 and 6to4 of 10.0.0.1
]  # fmt: skip
PUBLIC = ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2a00:1450:4001:80b::200e"]


@pytest.mark.parametrize("address", REFUSED)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is None


def test_the_allow_list_matches_host_and_port() -> None:
    patterns = parse_patterns(["hooks.example.com", "*.example.org:*", "127.0.0.1:8080", "[::1]:*"])
    assert check_url("https://hooks.example.com/x?y=1", patterns).port == 443
    assert check_url("http://hooks.example.com/", patterns).port == 80
    assert check_url("http://a.b.example.org:9999/", patterns).host == "a.b.example.org"
    assert check_url("http://127.0.0.1:8080/", patterns).host_header == "127.0.0.1:8080"
    assert check_url("http://[::1]:5/", patterns).host == "::1"
    for url, why in [
        ("https://hooks.example.com:8443/", "not allowed"),  # no port in the pattern: 80/443 only
        ("https://evil.com/", "not allowed"),
        ("https://example.org.evil.com/", "not allowed"),
        ("http://127.0.0.1:8081/", "not allowed"),
        ("ftp://hooks.example.com/", "scheme"),
        ("file:///etc/passwd", "scheme"),
        ("https://user:pw@hooks.example.com/", "credentials"),
        ("https:///nohost", "no host"),
        ("http://hooks.example.com:99999/", "not a URL"),
        ("https://hooks.example.com/" + "a" * 3000, "longer"),
    ]:
        with pytest.raises(TargetRefused, match=why):
            check_url(url, patterns)
    with pytest.raises(TargetRefused, match="empty: no host"):
        check_url("https://hooks.example.com/", [])


def test_private_literals_need_an_explicit_pattern() -> None:
    wildcard = parse_patterns(["*:*"])
    for url in [
        "http://10.0.0.1/",
        "http://127.0.0.1:9/",
        "http://[::ffff:169.254.169.254]/",
        "http://[::1]/",
    ]:
        with pytest.raises(TargetRefused, match="refused unless KDIFF_WEBHOOK_ALLOW names the host"):
            check_url(url, wildcard)
    assert check_url("http://127.0.0.1:9/", parse_patterns(["127.0.0.1:*"])).port == 9
    assert check_url("http://93.184.216.34/", wildcard).port == 80


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:9/",  # a name for loopback
        "http://2130706433:9/",  # 127.0.0.1 as one decimal number: the resolver reads it
        "http://0x7f000001:9/",  # ... in hex
        "http://167772161:9/",  # 10.0.0.1
        "http://0xa9fea9fe/",  # 169.254.169.254, the cloud metadata address
        "http://127.1:9/",  # short dotted form
    ],
)
def test_names_are_checked_after_resolution(url: str) -> None:
    """What passes the submit-time check as a host name is refused once resolved (the address is
    what is connected to)."""
    target = check_url(url, parse_patterns(["*:*"]))
    with pytest.raises(TargetRefused, match="refused unless"):
        asyncio.run(resolve(target))


def test_an_explicit_name_may_resolve_to_loopback() -> None:
    target = check_url("http://localhost:9/", parse_patterns(["localhost:*"]))
    assert asyncio.run(resolve(target)).is_loopback


def test_the_signature_verifies_as_stripe_documents() -> None:
    body, secret, now = b'{"id":"abc","status":"succeeded"}', "whsec_test", int(time.time())
    header = signature_header(secret, body, now)
    assert header.startswith(f"t={now},v1=") and len(header.split("v1=")[1]) == 64
    assert verify(header, body, secret, now) == "ok"
    assert verify(header, body + b" ", secret, now) == "no signature matches"
    assert verify(header, body, "other", now) == "no signature matches"
    assert (
        verify(signature_header(secret, body, now - 3600), body, secret, now)
        == "timestamp outside the tolerance"
    )
    # the timestamp is signed: moving it to pass the tolerance breaks the signature
    old = signature_header(secret, body, now - 3600)
    assert verify(old.replace(f"t={now - 3600}", f"t={now}"), body, secret, now) == "no signature matches"


def test_backoff_grows_with_jitter_and_a_cap() -> None:
    for attempts, step in [(1, 2.0), (2, 4.0), (3, 8.0), (4, 16.0), (20, 3600.0)]:
        delays = [backoff_s(attempts, 2.0, 3600.0) for _ in range(200)]
        assert all(step / 2 <= d <= step for d in delays)
        assert max(delays) - min(delays) > step / 10  # jittered, not one value


def _delivery(i: int) -> Delivery:
    return Delivery(f"d{i}", f"job{i}", "owner", "http://127.0.0.1:9/", "job.succeeded", b"{}", 1000.0 + i)


def test_the_outbox_table_survives_reopening_the_state_file(tmp_path: Path) -> None:
    db = StateDB(tmp_path)
    box = StateOutbox(db)
    assert box.add(_delivery(1)) and box.add(_delivery(2))
    assert not box.add(_delivery(1))  # the same delivery id twice: kept once
    # inside a caller's transaction (the job store's terminal listener): committed with it
    assert db.write(lambda conn: StateOutbox.insert(conn, _delivery(3))).result()
    assert not db.write(lambda conn: StateOutbox.insert(conn, _delivery(3))).result()
    d = _delivery(2)
    d.record(Attempt(1001.0, 0.5, 500, "the receiver answered 500"))
    d.next_at = 1010.0
    box.save(d)
    db.close()  # commits what is queued
    db = StateDB(tmp_path)
    again = StateOutbox(db)
    loaded = again.load(since=0)
    assert [x.id for x in loaded] == ["d1", "d2", "d3"]
    assert loaded[1].attempts == d.attempts and loaded[1].next_at == 1010.0 and loaded[1].body == b"{}"
    again.purge(before=1001.5, finished_before=0)
    assert [x.id for x in again.load(since=0)] == ["d2", "d3"]
    d.state = "delivered"
    again.save(d)
    again.purge(before=0, finished_before=1002.5)  # finished ones go sooner than pending ones
    assert [x.id for x in again.load(since=0)] == ["d3"]
    db.close()


def test_the_memory_outbox_keeps_pending_deliveries_only() -> None:
    box = MemoryOutbox()
    for i in range(3):
        box.add(_delivery(i))
    done = _delivery(1)
    done.state = "failed"
    box.save(done)
    assert [d.id for d in box.load(since=0)] == ["d0", "d2"]

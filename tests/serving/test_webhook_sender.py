"""The delivery thread against a real HTTP receiver on 127.0.0.1 (no service): retries, refusals,
redirects, timeouts, and the connection pinned to the checked address."""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Iterator

import pytest

from service.serving.webhooks import parse_patterns
from service.serving.webhooks import sender as sender_module
from service.serving.webhooks.outbox import Delivery, MemoryOutbox
from service.serving.webhooks.sender import Sender, SenderConfig
from service.serving.webhooks.targets import Target
from tests.support.webhook_receiver import Receiver

SECRET = "whsec_sender_test"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(SECRET)
    yield r
    r.close()


def run(
    deliveries: list[Delivery], allow: list[str], timeout_s: float = 5.0, max_age_s: float = 60.0
) -> MemoryOutbox:
    """Deliver, and wait until none is pending."""
    outbox = MemoryOutbox()
    config = SenderConfig(
        SECRET, parse_patterns(allow), timeout_s, max_age_s, retry_base_s=0.05, concurrency=4
    )
    sender = Sender(config, outbox, threading.Lock())
    sender.start()
    try:
        for d in deliveries:
            outbox.add(d)
            sender.submit(d)
        deadline = time.monotonic() + 30
        while any(d.state == "pending" for d in deliveries) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        sender.stop()
    return outbox


def delivery(url: str, i: int = 0) -> Delivery:
    return Delivery(f"d{i}", f"job{i}", None, url, "job.succeeded", b'{"id":"job%d"}' % i, time.time())


def test_retries_until_the_receiver_accepts(receiver: Receiver) -> None:
    d = delivery(receiver.on("/flaky", fail_first=3))
    run([d], ["127.0.0.1:*"])
    assert d.state == "delivered" and d.attempt_count == 4 and d.body == b""  # its record only
    assert [a.status_code for a in d.attempts] == [500, 500, 500, 200]
    posts = receiver.posts("/flaky")
    assert len(posts) == 4 and all(p.verdict == "ok" for p in posts)  # every attempt signed afresh
    assert {p.headers["Kdiff-Delivery"] for p in posts} == {"d0"}
    gaps = [b.at - a.at for a, b in zip(posts, posts[1:], strict=False)]
    assert all(g >= 0.02 for g in gaps)  # backed off (0.05 s base, equal jitter: >= half the step)


def test_gives_up_after_max_age(receiver: Receiver) -> None:
    d = delivery(receiver.on("/down", fail_first=10**6))
    run([d], ["127.0.0.1:*"], max_age_s=0.5)
    assert d.state == "failed" and d.attempt_count >= 2
    assert "gave up after" in (d.attempts[-1].error or "")


def test_a_redirect_is_not_followed(receiver: Receiver) -> None:
    target = receiver.on("/ok")
    d = delivery(receiver.on("/moved", redirect_to=target))
    run([d], ["127.0.0.1:*"])
    assert d.state == "failed" and d.attempt_count == 1 and d.attempts[0].status_code == 302
    assert "not followed" in (d.attempts[0].error or "")
    assert receiver.posts("/ok") == []


def test_a_name_resolving_to_loopback_is_refused_and_not_retried(receiver: Receiver) -> None:
    receiver.on("/x")
    d = delivery(f"http://localhost:{receiver.port}/x")
    run([d], ["*:*"])
    assert d.state == "failed" and d.attempt_count == 1
    assert "refused" in (d.attempts[0].error or "") and "loopback" in (d.attempts[0].error or "")
    assert receiver.posts() == []


def test_a_slow_receiver_times_out_and_is_retried(receiver: Receiver) -> None:
    d = delivery(receiver.on("/slow", delay_s=1.5))
    t0 = time.monotonic()
    run([d], ["127.0.0.1:*"], timeout_s=0.3, max_age_s=0.8)
    assert d.state == "failed" and all("no answer within 0.3 s" in (a.error or "") for a in d.attempts)
    assert all(a.duration_s < 0.6 for a in d.attempts)
    assert time.monotonic() - t0 < 5


def test_the_connection_goes_to_the_checked_address(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the name is resolved once per attempt, by the check, and the connection goes
    to that address (here a name no DNS knows, checked as 127.0.0.1), with the name as Host."""
    seen: list[str] = []

    async def checked(target: Target) -> ipaddress.IPv4Address:
        seen.append(target.host)
        return ipaddress.IPv4Address("127.0.0.1")

    monkeypatch.setattr(sender_module, "resolve", checked)
    receiver.on("/pinned")
    d = delivery(f"http://hooks.invalid:{receiver.port}/pinned")
    run([d], ["hooks.invalid:*"])
    assert d.state == "delivered", d.attempts
    assert seen == ["hooks.invalid"]
    (post,) = receiver.posts("/pinned")
    assert post.headers["Host"] == f"hooks.invalid:{receiver.port}" and post.verdict == "ok"


def test_an_endless_answer_is_read_up_to_a_bound(receiver: Receiver) -> None:
    d = delivery(receiver.on("/flood", flood=True))
    run([d], ["127.0.0.1:*"], timeout_s=5.0)
    assert d.state == "delivered" and d.attempts[0].duration_s < 2.0


def test_a_delivery_handed_over_twice_runs_once(receiver: Receiver) -> None:
    d = delivery(receiver.on("/once", delay_s=0.3))
    outbox = MemoryOutbox()
    config = SenderConfig(SECRET, parse_patterns(["127.0.0.1:*"]), retry_base_s=0.05)
    sender = Sender(config, outbox, threading.Lock())
    sender.start()
    try:
        sender.submit(d)
        sender.submit(d)
        receiver.wait("/once", 1)
        time.sleep(0.5)
    finally:
        sender.stop()
    assert len(receiver.posts("/once")) == 1 and d.attempt_count == 1

"""A webhook receiver on 127.0.0.1 for the tests, verifying each POST the way Stripe documents
verifying its signatures ("Verify manually", stripe.com/docs/webhooks/signature):

1. split the signature header on ``,`` and each element on the first ``=``; ``t`` is the timestamp,
   every ``v1`` a signature (other schemes ignored);
2. the signed payload is ``<t>.<raw request body>``;
3. compute HMAC-SHA256 of it with the endpoint secret, hex;
4. compare it to each ``v1`` in constant time, and reject a timestamp too far from now
   (Stripe's default tolerance: 5 minutes).

Written from that description only, not from the service's code. Per path, a behaviour: answer
200, fail the first N attempts of each delivery (500), answer slowly, or redirect.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOLERANCE_S = 300


def verify(
    header: str | None, payload: bytes, secret: str, now: float, tolerance_s: float = TOLERANCE_S
) -> str:
    """ "ok", or why the signature is refused."""
    if not header:
        return "no signature header"
    items = [part.split("=", 1) for part in header.split(",") if "=" in part]
    stamps = [v for k, v in items if k.strip() == "t"]
    signatures = [v for k, v in items if k.strip() == "v1"]
    if len(stamps) != 1 or not signatures:
        return "no timestamp or no v1 signature"
    try:
        timestamp = int(stamps[0])
    except ValueError:
        return "timestamp is not an integer"
    expected = hmac.new(secret.encode(), stamps[0].encode() + b"." + payload, hashlib.sha256).hexdigest()
    if not any(hmac.compare_digest(expected.encode(), s.encode()) for s in signatures):
        return "no signature matches"
    if abs(now - timestamp) > tolerance_s:
        return "timestamp outside the tolerance"
    return "ok"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    verdict: str  # verify()'s answer
    at: float
    status: int  # what the receiver answered

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Behaviour:
    fail_first: int = 0  # answer 500 to the first N attempts of each delivery
    delay_s: float = 0.0  # sleep before answering
    redirect_to: str | None = None  # answer 302 with this Location
    flood: bool = False  # answer 200 with an endless body
    seen: dict[str, int] = field(default_factory=dict)  # attempts per delivery id


class Receiver:
    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.received: list[Received] = []
        self.behaviours: dict[str, Behaviour] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                verdict = verify(self.headers.get("Kdiff-Signature"), body, receiver.secret, time.time())
                path = self.path.split("?")[0]
                b = receiver.behaviours.get(path, Behaviour())
                delivery = self.headers.get("Kdiff-Delivery", "")
                with receiver.lock:
                    b.seen[delivery] = b.seen.get(delivery, 0) + 1
                    n = b.seen[delivery]
                if b.delay_s:
                    time.sleep(b.delay_s)
                status = 302 if b.redirect_to else 500 if n <= b.fail_first else 200
                with receiver.lock:
                    receiver.received.append(
                        Received(self.path, dict(self.headers), body, verdict, time.time(), status)
                    )
                if b.flood:
                    self.flood()
                    return
                try:
                    self.send_response(status)
                    if b.redirect_to:
                        self.send_header("Location", b.redirect_to)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                except OSError:
                    pass  # the sender gave up waiting (a slow-receiver test) and closed

            def flood(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(10**12))
                self.end_headers()
                try:
                    while True:
                        self.wfile.write(b"x" * 2**20)
                except OSError:
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def on(self, path: str, **behaviour: Any) -> str:
        self.behaviours[path] = Behaviour(**behaviour)
        return self.url(path)

    def arrived(self, path: str) -> int:
        """Requests that reached ``path`` (answered or not yet)."""
        with self.lock:
            return sum(self.behaviours[path].seen.values())

    def posts(self, path: str | None = None) -> list[Received]:
        with self.lock:
            return [r for r in self.received if path is None or r.path.split("?")[0] == path]

    def wait(self, path: str, count: int, timeout_s: float = 30.0, ok_only: bool = True) -> list[Received]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = [r for r in self.posts(path) if r.status == 200 or not ok_only]
            if len(got) >= count:
                return got
            time.sleep(0.05)
        raise TimeoutError(f"{path}: {len(self.posts(path))} posts, wanted {count}: {self.posts(path)}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

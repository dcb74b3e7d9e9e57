"""Oversized bodies are refused before they are read (413; 401 first without a key), slow clients are
cut off (headers, body), and none of it costs the server memory or other clients their answers."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.api.comfy.sockets import WS_MAX_MESSAGE_BYTES
from tests.support.server import Server

from .support import KEY1, raw_request, rss_mib, start, status_of

BIG = 50 * 10**6  # 50 MB, past the 34 MB default limit


@pytest.fixture(scope="module")
def impatient(reliability_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with 1 s header, body and send deadlines (the shared one keeps the defaults, so a
    loaded machine cannot make the other tests' clients look slow)."""
    log = tmp_path_factory.mktemp("impatient") / "server.log"
    srv = start(
        reliability_store,
        log,
        KDIFF_HEADER_TIMEOUT_S="1",
        KDIFF_BODY_TIMEOUT_S="1",
        KDIFF_SEND_TIMEOUT_S="1",
    )
    try:
        yield srv
    finally:
        srv.stop()


def _post_head(length: int | None, key: str | None, chunked: bool = False) -> bytes:
    lines = ["POST /sample HTTP/1.1", "Host: x", "Content-Type: application/json"]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _big_body() -> bytes:
    filler = b"A" * (BIG - 40)
    return b'{"init_image": "' + filler + b'", "steps": 1}'


def _send_big(port: int, body: bytes, key: str | None, chunked: bool) -> tuple[int, float]:
    if chunked:  # no Content-Length: refused while streaming, once past the limit
        chunks = b"".join(
            b"%x\r\n" % len(part) + part + b"\r\n"
            for part in (body[i : i + 2**20] for i in range(0, len(body), 2**20))
        )
        data = _post_head(None, key, chunked=True) + chunks + b"0\r\n\r\n"
    else:
        data = _post_head(len(body), key) + body
    t0 = time.monotonic()
    return status_of(raw_request(port, data)), time.monotonic() - t0


def _rounds(server: Server, cases: list[tuple[str | None, bool]], rounds: int) -> tuple[list[float], list]:
    """``rounds`` rounds of the ``cases`` sent at once; RSS before and after each round."""
    body = _big_body()
    results: list[tuple[str | None, bool, int, float]] = []

    def send(key: str | None, chunked: bool) -> None:
        results.append((key, chunked, *_send_big(server.port, body, key, chunked)))

    curve = [rss_mib(server.proc.pid)]
    for _ in range(rounds):
        threads = [threading.Thread(target=send, args=case) for case in cases]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        curve.append(rss_mib(server.proc.pid))
    assert len(results) == rounds * len(cases)
    for key, _chunked, status, _dt in results:
        assert status == (413 if key is not None else 401)
    return curve, results


def test_oversized_bodies_get_413_or_401_before_being_read(server: Server) -> None:
    """50 MB bodies: with Content-Length (key or not) and chunked without a key, nothing is read, so
    the server does not grow at all; a chunked body with a valid key has no size up front: it is read
    up to the (1 MiB) chunked limit and refused the moment it passes, and rounds of them cost nothing."""
    unread = [(KEY1, False), (None, False), (None, True)] * 2
    curve, results = _rounds(server, unread, 2)
    print(f"\nrefused unread: {[(k is not None, c, s, round(dt, 2)) for k, c, s, dt in results]}")
    print("server RSS before and after each round of 6 (MiB): " + ", ".join(f"{v:.0f}" for v in curve))
    assert curve[-1] - curve[0] < 20, f"RSS grew {curve[-1] - curve[0]:.1f} MiB for bodies never read"
    streamed, results = _rounds(server, [(KEY1, True)] * 2, 4)
    print(f"refused chunked: {[round(dt, 2) for *_, dt in results]}")
    print("server RSS before and after each round of 2 (MiB): " + ", ".join(f"{v:.0f}" for v in streamed))
    assert streamed[-1] - streamed[0] < 20, f"refused chunked bodies accumulate: {streamed}"
    assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200


def test_slow_headers_are_cut_off_and_do_not_slow_others(impatient: Server) -> None:
    """50 clients sending headers a byte at a time: each is closed after the 1 s header deadline."""
    socks = []
    for _ in range(50):
        s = socket.create_connection(("127.0.0.1", impatient.port), timeout=10)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        socks.append(s)
    t0 = time.monotonic()
    r = httpx.post(
        f"{impatient.url}/sample",
        json={"class_label": 1, "steps": 2},
        headers={"Authorization": f"Bearer {KEY1}"},
    )
    assert r.status_code == 200
    closed = 0
    for s in socks:
        s.settimeout(3)
        try:
            s.sendall(b"s")  # keep dripping; the server must have closed the socket
            closed += s.recv(1024) == b""
        except (ConnectionResetError, BrokenPipeError):
            closed += 1
        except TimeoutError:
            pass  # still open: not cut off
        s.close()
    elapsed = time.monotonic() - t0
    print(f"\n50 slow-header clients closed after {elapsed:.1f} s (header deadline 1 s)")
    assert closed == 50
    assert elapsed < 8


def test_a_slow_body_gets_408(impatient: Server) -> None:
    with socket.create_connection(("127.0.0.1", impatient.port), timeout=10) as s:
        body = b'{"class_label": 1, "steps": 2}'
        s.sendall(_post_head(len(body), KEY1) + body[:5])
        t0 = time.monotonic()
        answer = s.recv(4096)
        waited = time.monotonic() - t0
    assert status_of(answer) == 408, answer[:200]
    assert 0.5 < waited < 5


def test_connections_over_the_cap_get_503_and_the_service_recovers(
    reliability_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    srv = start(reliability_store, tmp_path_factory.mktemp("cap") / "server.log", KDIFF_MAX_CONNECTIONS="4")
    try:
        held = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(4)]
        time.sleep(0.2)  # the server has accepted them
        r = httpx.get(f"{srv.url}/healthz", timeout=10)
        assert r.status_code == 503, r.text
        for s in held:
            s.close()
        time.sleep(0.2)
        assert httpx.get(f"{srv.url}/healthz", timeout=10).status_code == 200
    finally:
        srv.stop()


def _unread_responses(port: int, requests: int) -> socket.socket:
    """A client that asks for ``requests`` API schemas (84 KB each) at once, pipelined, and reads
    none of them: far more than the socket buffers hold, so the server's writes stall."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * requests)
    return s


def _read_all(s: socket.socket) -> tuple[int, bool]:
    """(responses received, whether the server ended the connection) once the client reads again."""
    data, deadline = b"", time.monotonic() + 3
    s.settimeout(1)
    try:
        while time.monotonic() < deadline:
            chunk = s.recv(1 << 20)
            if not chunk:
                return data.count(b"HTTP/1.1 200"), True
            data += chunk
    except ConnectionResetError:
        return data.count(b"HTTP/1.1 200"), True
    except TimeoutError:
        pass
    return data.count(b"HTTP/1.1 200"), False  # still open: the server was waiting for this reader


def test_clients_that_never_read_are_dropped_after_the_send_deadline(impatient: Server) -> None:
    """Four clients that pipeline 200 requests each and read nothing. Before the send deadline each
    held its connection, and the answers it never took, for good (100 such sockets were all still
    open after 40 s): enough of them fill KDIFF_MAX_CONNECTIONS and every client gets 503. Now each is
    aborted once its writes have been stalled for the deadline (1 s here), and others are served."""
    stuck = [_unread_responses(impatient.port, 200) for _ in range(4)]
    time.sleep(2.5)  # the stall, the 1 s deadline, and room for a loaded machine
    r = httpx.post(
        f"{impatient.url}/sample",
        json={"class_label": 1, "steps": 2},
        headers={"Authorization": f"Bearer {KEY1}"},
    )
    assert r.status_code == 200
    outcomes = [_read_all(s) for s in stuck]
    for s in stuck:
        s.close()
    print(f"\nstuck readers (responses taken of 200, dropped by the server): {outcomes}")
    assert all(ended and got < 200 for got, ended in outcomes), outcomes


def test_a_websocket_message_past_the_limit_closes_the_socket(server: Server) -> None:
    """ComfyUI's socket reads what clients send only to notice a close (its clients send nothing,
    or a small `feature_flags` JSON). uvicorn's default let each message be 16 MiB: 20 clients sending
    8 MiB messages took the server to 1.9 GiB and stalled /healthz up to 17.6 s while it assembled
    them. Now a message over WS_MAX_MESSAGE_BYTES closes the socket (1009) as its header arrives."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    url = f"ws://127.0.0.1:{server.port}/ws?clientId=big"
    with connect(url, additional_headers={"Authorization": f"Bearer {KEY1}"}, open_timeout=10) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "status"
        ws.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
        ws.ping().wait(10)  # a small message keeps the socket open
        with pytest.raises(ConnectionClosed) as closed:
            ws.send(b"x" * WS_MAX_MESSAGE_BYTES * 16)  # 1 MiB
            ws.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009, closed.value


def test_request_heads_past_the_limit_get_431(server: Server) -> None:
    """h11's 16 KiB head limit applies only to a head still incomplete after a read (up to 256 KiB):
    10,000 headers sent at once were parsed (32 ms of the event loop each) and answered 200."""
    many = "".join(f"X-H{i}: v\r\n" for i in range(10_000))
    big = "X-Big: " + "a" * 100_000 + "\r\n"
    for extra in (many, big):
        answer = raw_request(server.port, f"GET /healthz HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
        assert status_of(answer) == 431, answer[:200]
    # what browsers and clients send passes: 40 headers and an 8 KB cookie, a head split over reads
    browser = (
        "".join(f"X-H{i}: v\r\n" for i in range(40)) + "Cookie: " + "c" * 8000 + "\r\nConnection: close\r\n"
    )
    assert (
        status_of(raw_request(server.port, f"GET /healthz HTTP/1.1\r\nHost: x\r\n{browser}\r\n".encode()))
        == 200
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r")  # the head's end split between two reads
        time.sleep(0.2)
        s.sendall(b"\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answers = b""
        while chunk := s.recv(65536):
            answers += chunk
    assert answers.count(b"HTTP/1.1 200") == 2, answers

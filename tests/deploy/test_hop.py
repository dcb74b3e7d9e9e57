"""The ingress -> engine HTTP hop (service/deploy/hop.py) against real sockets, without Ray: the engine
port's gate, what the forward carries, a replica restarted at a new address, engines that die."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from service.deploy.hop import (
    CLIENT_HEADER,
    HOST_HEADER,
    SECRET_HEADER,
    Engines,
    Gone,
    HopGuard,
    Listener,
    reuse_port_socket,
)

pytestmark = pytest.mark.timeout(60)
SECRET = "s3cret"


async def echo(scope: Any, receive: Any, send: Any) -> None:
    """Answers with what it was given: method, path, query, headers, client, scheme, body."""
    body = b""
    while True:
        m = await receive()
        body += m.get("body", b"")
        if not m.get("more_body"):
            break
    seen = {
        "method": scope["method"],
        "path": scope["path"],
        "query": scope["query_string"].decode(),
        "headers": {k.decode(): v.decode() for k, v in scope["headers"]},
        "client": list(scope["client"]) if scope["client"] else None,
        "scheme": scope["scheme"],
        "body": body.decode(),
    }
    if scope["path"] == "/stream":  # no content-length: chunked, as SSE is
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        for part in (b"one ", b"two ", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    data = json.dumps(seen).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": 201, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class Info:
    def __init__(self, answer: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        self.answer, self.calls = answer, 0

    def remote(self) -> Awaitable[dict[str, Any]]:
        self.calls += 1
        return self.answer()


class Handle:
    """What Engines uses of a Serve deployment handle: ``await handle.info.remote()``."""

    def __init__(self, answer: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        self.info = Info(answer)


def engine(app: Any = echo) -> Listener:
    return Listener(HopGuard(app, SECRET), reuse_port_socket("127.0.0.1", 0))


def url_of(listener: Listener) -> str:
    return f"http://127.0.0.1:{listener.port}"


async def up(listener: Listener) -> None:
    for _ in range(200):
        if listener.server.started:
            return
        await asyncio.sleep(0.01)
    raise TimeoutError("listener did not start")


async def dead_url() -> str:
    """The address of an engine that has stopped (nothing listens there now)."""
    listener = engine()
    await up(listener)
    url = url_of(listener)
    await listener.stop()
    return url


def request(path: str = "/sample", **extra: Any) -> dict[str, Any]:
    headers = [("host", "front:8000"), ("content-type", "application/json"), ("authorization", "Bearer k")]
    headers += [(SECRET_HEADER, "forged"), (CLIENT_HEADER, "6.6.6.6 1 https")]  # a caller's, never passed on
    return {
        "method": "POST",
        "path": path,
        "query": "a=1&b=2",
        "headers": headers,
        "body": b'{"x": 1}',
        **extra,
    }


def test_the_engine_port_takes_only_the_ingress_and_the_caller_as_the_ingress_saw_it() -> None:
    async def run() -> None:
        listener = engine()
        await up(listener)
        async with httpx.AsyncClient(base_url=url_of(listener)) as c:
            assert (await c.get("/samplers")).status_code == 403
            assert (await c.get("/samplers", headers={SECRET_HEADER: "wrong"})).status_code == 403
            ok = await c.get("/x", headers={SECRET_HEADER: SECRET, CLIENT_HEADER: "10.1.2.3 4567 https"})
            assert ok.status_code == 201
            seen = ok.json()
            assert seen["client"] == ["10.1.2.3", 4567] and seen["scheme"] == "https"
            assert SECRET_HEADER not in seen["headers"] and CLIENT_HEADER not in seen["headers"]
        await listener.stop()

    asyncio.run(run())


def test_a_forward_carries_the_request_and_the_callers_address() -> None:
    async def run() -> None:
        listener = engine()
        await up(listener)
        handle = Handle(lambda: _value({"url": url_of(listener)}))
        engines = Engines([handle], SECRET)
        answer = await engines.send(0, request(client=["192.0.2.7", 5555], scheme="http"), wait_s=5)
        assert answer.status == 201 and not answer.more
        seen = json.loads(answer.body)
        assert seen["method"] == "POST" and seen["path"] == "/sample" and seen["query"] == "a=1&b=2"
        assert seen["body"] == '{"x": 1}' and seen["headers"]["authorization"] == "Bearer k"
        assert seen["client"] == ["192.0.2.7", 5555] and seen["scheme"] == "http"  # not the forged one
        assert (
            seen["headers"]["host"] == "front:8000"
        )  # links the engine's app builds name the public address
        assert HOST_HEADER not in seen["headers"]
        streamed = await engines.send(0, request("/stream"), wait_s=5)
        assert streamed.more and b"".join([c async for c in streamed.chunks()]) == b"one two three"
        await streamed.close()
        assert handle.info.calls == 1  # the address is asked once, then kept
        # TCP keepalive on the pooled connection: a vanished engine host ends a quiet read
        (conn,) = engines.client._transport._pool.connections  # type: ignore[attr-defined]
        sock = conn._connection._network_stream.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
        await engines.aclose()
        await listener.stop()

    asyncio.run(run())


async def _value(v: Any) -> Any:
    return v


async def _never() -> dict[str, Any]:
    await asyncio.sleep(3600)
    return {}


def test_a_replica_restarted_at_a_new_address_is_found_again() -> None:
    async def run() -> None:
        first, second = engine(), engine()
        await up(first)
        await up(second)
        addresses = [url_of(first), url_of(second)]
        handle = Handle(lambda: _value({"url": addresses.pop(0)}))
        engines = Engines([handle], SECRET)
        assert (await engines.send(0, request(), wait_s=5)).status == 201
        await first.stop()  # the replica died; Serve's replacement listens at the second address
        answer = await engines.send(0, request(), wait_s=5)
        assert answer.status == 201 and handle.info.calls == 2
        await engines.aclose()
        await second.stop()

    asyncio.run(run())


def test_refused_with_no_replica_up_is_gone_within_the_wait() -> None:
    async def run() -> None:
        dead = await dead_url()
        answers = [_value({"url": dead}), _never()]  # then no replica ever answers

        handle = Handle(lambda: answers.pop(0))
        engines = Engines([handle], SECRET)
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(Gone):
            await engines.send(0, request(), wait_s=0.3)
        assert asyncio.get_running_loop().time() - t0 < 5
        await engines.aclose()

    asyncio.run(run())


async def raw_engine(
    behaviour: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> tuple[asyncio.base_events.Server, str, list[int]]:
    """A TCP server that plays a dying engine; counts the connections it got."""
    count = [0]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        count[0] += 1
        await reader.readuntil(b"\r\n\r\n")
        await behaviour(reader, writer)
        writer.transport.abort()  # the process is gone: the connection drops

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", count


def test_an_engine_that_took_the_request_and_died_is_gone_and_not_asked_again() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(8)  # part of the body, then nothing

    async def run() -> None:
        server, url, count = await raw_engine(silent)
        engines = Engines([Handle(lambda: _value({"url": url}))], SECRET)
        with pytest.raises(Gone):
            await engines.send(0, request(), wait_s=5)
        assert count == [1]  # not sent twice: it may have started the work (the ingress decides)
        assert engines.urls == [None]  # the address is asked again next time
        await engines.aclose()
        server.close()

    asyncio.run(run())


def test_an_engine_that_dies_mid_stream_ends_the_chunks_with_gone() -> None:
    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        writer.write(b"9\r\nevent: a\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)

    async def run() -> None:
        server, url, _ = await raw_engine(half)
        engines = Engines([Handle(lambda: _value({"url": url}))], SECRET)
        answer = await engines.send(0, request("/jobs/x/events"), wait_s=5)
        assert answer.more and answer.status == 200
        got = []
        with pytest.raises(Gone):
            async for chunk in answer.chunks():
                got.append(chunk)
        assert got == [b"event: a\n"]
        await answer.close()
        await engines.aclose()
        server.close()

    asyncio.run(run())


def test_without_reask_a_refused_engine_is_gone_at_once() -> None:
    """When another engine may take the request, a refused one is not waited for (Serve restarting it)."""

    async def run() -> None:
        dead = await dead_url()
        handle = Handle(lambda: _value({"url": dead}))
        engines = Engines([handle], SECRET)
        with pytest.raises(Gone):
            await engines.send(0, request(), wait_s=60, reask=False)
        assert handle.info.calls == 1 and engines.urls == [None]
        await engines.aclose()

    asyncio.run(run())


def test_the_engine_port_refuses_websockets() -> None:
    """The ingress forwards HTTP only, so a websocket on the engine port (the ComfyUI /ws route) comes from
    someone else: refused, secret or not, never handed to the app."""
    import websockets

    handed: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        handed.append(scope["type"])
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})

    async def run() -> None:
        listener = engine(app)
        await up(listener)
        for headers in ({}, {SECRET_HEADER: SECRET}):
            with pytest.raises(websockets.exceptions.InvalidStatus):
                async with websockets.connect(
                    f"ws://127.0.0.1:{listener.port}/ws", additional_headers=headers
                ):
                    pass
        assert handed == []
        await listener.stop()

    asyncio.run(run())

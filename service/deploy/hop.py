"""The ingress -> engine hop over plain HTTP (issue 28 §5): each engine replica serves its app on a port
of its own, and the ingress forwards requests there with a pooled keep-alive client, instead of passing
them as data through a Serve deployment handle (Serve's replica wrapper, pickling and Ray's core worker
cost about 0.1x of a digits request there; a plain HTTP forward about 0.02x: docs/BENCHMARKS.md).

Serve still places, health-checks and restarts the engine replicas; the ingress learns an engine's
address from its handle (``info()``, asked again whenever the address stops answering: a restarted
replica listens elsewhere). The engine's port takes only requests that carry the application's hop
secret, and trusts the caller's address only from them (A1111 callers without keys are told apart by
address, service/api/compat/caller.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

SECRET_HEADER = "x-kdiff-hop"
CLIENT_HEADER = "x-kdiff-client"  # "host port scheme" of the caller the ingress saw
# the Host the caller sent: links the app builds (OpenAI's image url) name it, not the engine's address
HOST_HEADER = "x-kdiff-host"
# Headers of one connection, not passed on across the hop (either way: each side frames its own body).
HOP_BY_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}
DROPPED = HOP_BY_HOP | {SECRET_HEADER, CLIENT_HEADER, HOST_HEADER}  # a caller's forged hop headers too


class HopGuard:
    """The engine port's gate: requests without the hop secret get 403; with it, the caller's address,
    scheme and Host as the ingress saw them replace the ingress's own. Websockets are refused: the ingress
    forwards HTTP only, so one here did not come through it."""

    def __init__(self, app: ASGIApp, secret: str) -> None:
        self.app, self.secret = app, secret.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            return await send({"type": "websocket.close", "code": 1008})
        if scope["type"] != "http":  # lifespan: the app's own is run by the engine replica
            return
        given, client, host, kept = b"", b"", b"", []
        for k, v in scope["headers"]:
            if k == SECRET_HEADER.encode():
                given = v
            elif k == CLIENT_HEADER.encode():
                client = v
            elif k == HOST_HEADER.encode():
                host = v
            elif k != b"host":  # the hop's own (the engine's address); the caller's comes below
                kept.append((k, v))
        if not hmac.compare_digest(given, self.secret):
            await send({"type": "http.response.start", "status": 403, "headers": []})
            await send({"type": "http.response.body", "body": b"requests come through the ingress"})
            return
        scope = {**scope, "headers": [(b"host", host), *kept] if host else kept}
        parts = client.decode("latin-1").split()
        if len(parts) == 3:
            scope["client"], scope["scheme"] = (parts[0], int(parts[1])), parts[2]
        elif len(parts) == 1:  # a scheme alone: the ingress saw no client address
            scope["client"], scope["scheme"] = None, parts[0]
        await self.app(scope, receive, send)


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening socket that other processes of this host may bind too (SO_REUSEPORT: the kernel
    spreads new connections over every ingress replica of the node, as Serve's proxy spread requests)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the signals are the Ray worker's, not this server's
        yield


class Listener:
    """uvicorn serving ``app`` on ``sock`` inside this process's running event loop (a Serve replica's).
    An engine's port keeps the ingress's pooled connections 75 s (uvicorn's default is 5 s); the
    ingress's public port passes ``kdiff serve``'s own guards (header deadline, keep-alive, connections)."""

    def __init__(
        self,
        app: ASGIApp,
        sock: socket.socket,
        log_level: str = "warning",
        *,
        http: type[asyncio.Protocol] | str = "auto",
        keep_alive_s: int = 75,
        limit_concurrency: int | None = None,
    ) -> None:
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_level=log_level,
            access_log=False,
            http=http,
            timeout_keep_alive=keep_alive_s,
            limit_concurrency=limit_concurrency,
        )
        self.sock, self.server = sock, _Server(config)
        self.task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[sock]))

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def alive(self) -> bool:
        return not self.task.done()

    async def stop(self) -> None:
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), 10)
        except (asyncio.TimeoutError, Exception):
            self.task.cancel()


def _keepalive() -> list[tuple[int, int, int]]:
    """TCP keepalive for the hop's connections: probes after 30 s idle, every 10 s, 3 unanswered -> closed."""
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):  # Linux has them all; elsewhere the system's defaults
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    return options


KEEPALIVE = _keepalive()


# errors after the engine may have taken the request
TAKEN = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError, httpx.ConnectTimeout)


class Gone(Exception):
    """The engine's address did not answer: refused (``taken`` false: it never had the request), or the
    connection closed before a response (``taken``: it may have started on it)."""

    def __init__(self, message: str, taken: bool = False) -> None:
        super().__init__(message)
        self.taken = taken


class NotUp(Exception):
    """No replica of the engine told its address within the time given (dead, not yet replaced)."""


@dataclass
class Answer:
    """An engine's response: ``body`` whole when ``more`` is false, else the rest comes from ``chunks``."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    more: bool
    response: httpx.Response | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        assert self.response is not None
        try:
            async for chunk in self.response.aiter_raw():
                if chunk:
                    yield chunk
        except (httpx.ReadError, httpx.RemoteProtocolError) as exc:
            raise Gone(str(exc)) from exc

    async def close(self) -> None:
        """Close the engine's response (for /sample and SSE the engine sees its client go away)."""
        if self.response is not None:
            await self.response.aclose()


class Engines:
    """The ingress's link to every engine slot: its address (from its Serve handle) and one pooled
    HTTP client for all of them."""

    def __init__(self, handles: list[Any], secret: str) -> None:
        self.handles, self.secret = handles, secret
        self.urls: list[str | None] = [None] * len(handles)
        self.locks = [asyncio.Lock() for _ in handles]
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=60)
        # no read timeout (a /sample or an event stream may be quiet for minutes), so TCP keepalive finds
        # an engine host that vanished without a reset (about a minute), where the read would never end
        timeout = httpx.Timeout(connect=5.0, read=None, write=60.0, pool=None)
        transport = httpx.AsyncHTTPTransport(limits=limits, socket_options=KEEPALIVE)
        self.client = httpx.AsyncClient(transport=transport, timeout=timeout)

    async def url(self, slot: int, wait_s: float | None) -> str:
        """The slot's address; asked of its replica (Serve holds the call until one is up) when unknown."""
        known = self.urls[slot]
        if known is not None:
            return known
        async with self.locks[slot]:
            if self.urls[slot] is None:
                try:
                    info = await asyncio.wait_for(self.handles[slot].info.remote(), wait_s)
                except asyncio.TimeoutError as exc:
                    raise NotUp(f"engine{slot}: no replica up within {wait_s} s") from exc
                except Exception as exc:  # its replica died while answering (RayActorError ...)
                    raise NotUp(f"engine{slot}: {type(exc).__name__}") from exc
                self.urls[slot] = info["url"]
            return self.urls[slot]  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.handles)

    def forget(self, slot: int, url: str) -> None:
        if self.urls[slot] == url:
            self.urls[slot] = None

    async def send(self, slot: int, req: dict[str, Any], wait_s: float | None, reask: bool = True) -> Answer:
        """One request to the slot's engine. A refused connection may be a replica Serve restarted at a
        new address: with ``reask``, asked once more there (waiting ``wait_s`` for it to be up); without,
        Gone at once (another engine may take the request). Raises Gone (it did not answer) or NotUp."""
        refused: httpx.ConnectError | None = None
        for _ in (0, 1):
            try:
                url = await self.url(slot, wait_s)
            except NotUp as exc:
                if refused is None:
                    raise
                raise Gone(f"{refused}; no replica up since") from exc
            try:
                return await self._send(url, req)
            except httpx.ConnectError as exc:
                self.forget(slot, url)
                if refused is not None or not reask:
                    raise Gone(str(exc)) from exc
                refused = exc
            except TAKEN as exc:
                self.forget(slot, url)  # it took the request and died (or is wedged): not sent again here
                raise Gone(str(exc), taken=True) from exc
        raise AssertionError("unreachable")

    async def _send(self, url: str, req: dict[str, Any]) -> Answer:
        headers = [(k, v) for k, v in req["headers"] if k.lower() not in DROPPED]
        client, scheme = req.get("client"), req.get("scheme", "http")
        seen = f"{client[0]} {client[1]} {scheme}" if client else scheme
        headers += [(SECRET_HEADER, self.secret), (CLIENT_HEADER, seen)]
        headers += [(HOST_HEADER, v) for k, v in req["headers"] if k.lower() == "host"][:1]
        target = url + req["path"] + ("?" + req["query"] if req.get("query") else "")
        body = req.get("body", b"")
        request = self.client.build_request(req["method"], target, headers=headers, content=body)
        response = await self.client.send(request, stream=True)
        head = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers.raw]
        if "content-length" in response.headers or response.request.method == "HEAD":
            try:
                body = await response.aread()
            finally:
                await response.aclose()
            return Answer(response.status_code, head, body, False)
        return Answer(response.status_code, head, b"", True, response)

    async def aclose(self) -> None:
        await self.client.aclose()

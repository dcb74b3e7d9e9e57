"""The gate in front of every route: who is calling (API key) and how much body they may send.

It runs before the body is read, so a client without a valid key, or with a body over the limit,
costs the service a header parse, not a buffered body. Pure ASGI: streaming responses pass as-is.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import time
from dataclasses import dataclass

from fastapi import HTTPException, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .settings import Settings

# Open without a key: probes for orchestrators, and (KDIFF_PUBLIC_DOCS, on by default) the API docs.
# Everything else, the catalogue routes included, needs a key when keys are set.
PROBES = frozenset({"/healthz", "/readyz", "/metrics"})
DOCS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
# Image links handed out by /v1/images/generations: the unguessable, short-lived token in the URL is
# the credential (as with OpenAI's own image URLs, which browsers fetch without the API key).
CAPABILITY_PREFIXES = ("/v1/images/files/",)
# The web playground (service/api/playground): the page and its static assets hold no data and ask
# for the key themselves, so they load without one.
PAGE, PAGE_PREFIX = "/", "/playground/"


@dataclass(frozen=True)
class Caller:
    """Who sent a request. ``key_id`` is a digest of the key (never the key itself); None when the
    service runs without keys. Admins see every job."""

    key_id: str | None
    admin: bool

    def owns(self, owner: str | None) -> bool:
        return self.admin or owner == self.key_id


ANONYMOUS = Caller(None, admin=True)  # no keys configured: one trust domain


def owner_of(request: Request) -> str | None:
    """The key id that owns the jobs this request creates (None without keys)."""
    caller = request.scope.get("state", {}).get("caller")
    return None if caller is None else caller.key_id


def key_id(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()[:16]


def _credentials(headers: dict[bytes, bytes]) -> str | None:
    """The secret a request presents: a Bearer token, or HTTP Basic ``user:pass`` (A1111 clients)."""
    raw = headers.get(b"authorization", b"").decode("latin-1").strip()
    scheme, _, value = raw.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if scheme.lower() == "basic" and value.strip():
        try:
            return base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
    return None


def authenticate(settings: Settings, headers: dict[bytes, bytes]) -> Caller | None:
    """The caller, or None when keys are set and the request brings none that matches."""
    keys = [k.get_secret_value() for k in settings.api_keys]
    admins = [k.get_secret_value() for k in settings.admin_keys]
    if not keys and not admins:
        return ANONYMOUS
    given = _credentials(headers)
    if given is None:
        return None
    found: Caller | None = None
    # compare against every key (no early exit) so the time taken does not tell which key matched
    for secret, admin in [*((k, False) for k in keys), *((k, True) for k in admins)]:
        if hmac.compare_digest(given.encode(), secret.encode()):
            found = Caller(key_id(secret), admin=admin or (found is not None and found.admin))
    return found


def is_open(settings: Settings, path: str) -> bool:
    return (
        path in PROBES
        or (settings.public_docs and path in DOCS)
        or path.startswith(CAPABILITY_PREFIXES)
        or path == PAGE
        or path.startswith(PAGE_PREFIX)
    )


def error_body(path: str, status: int, message: str, code: str | None = None) -> dict[str, object]:
    """The error in the shape the route's clients parse: OpenAI's under /v1, A1111's under /sdapi,
    FastAPI's ``detail`` elsewhere (the routes' own errors have the same shapes). With ``code`` (an
    ErrorCode value) the detail is ``{"code", "message"}``, as the service's own errors give it."""
    if path.startswith("/v1/"):
        kind = "server_error" if status >= 500 else "invalid_request_error"
        kind = "authentication_error" if status == 401 else kind
        code = code or {401: "invalid_api_key", 408: "timeout", 413: "request_too_large"}.get(status)
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}
    detail: object = message if code is None else {"code": code, "message": message}
    if path.startswith("/sdapi/"):
        return {"error": "HTTPException", "detail": detail, "body": "", "errors": message}
    return {"detail": detail}


async def _send_error(
    send: Send, path: str, status: int, message: str, headers: dict[str, str] | None = None
) -> None:
    body = json.dumps(error_body(path, status, message)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class HTTPMiddleware:
    """A pure-ASGI middleware (streaming-safe) over HTTP requests (:meth:`http`); other scopes
    (lifespan, websockets) pass through."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.http(scope, receive, send)

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class GuardMiddleware(HTTPMiddleware):
    """Authenticates every request before its body is read and bounds the body it may send.

    - keys set, path not open, no valid key -> 401 (the body is never read);
    - ``Content-Length`` over ``max_body_bytes`` -> 413 at once; a body without one (chunked) that
      grows past ``max_chunked_bytes`` -> 413 as soon as it does; a body that takes longer than
      ``body_timeout_s`` to arrive -> 408.
    The caller is left in ``scope["state"]["caller"]`` for the routes.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        super().__init__(app)
        self.settings = settings

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        s = self.settings
        headers = dict(scope["headers"])
        caller = authenticate(s, headers)
        if caller is None and not is_open(s, scope["path"]):
            await _send_error(
                send,
                scope["path"],
                401,
                "a valid API key is required (Authorization: Bearer <key>, or Basic user:pass)",
                # close: a refused client's body is not drained to keep its connection alive
                {"WWW-Authenticate": 'Bearer, Basic realm="kdiffusion-service"', "Connection": "close"},
            )
            return
        scope.setdefault("state", {})["caller"] = caller
        length = headers.get(b"content-length")
        limit, refused = body_limit(length, s.max_body_bytes, s.max_chunked_bytes)
        if refused:
            await _send_error(send, scope["path"], 413, too_large(limit), {"Connection": "close"})
            return
        counted = not headers.get(b"content-type", b"").lower().startswith(BINARY_BODIES)
        await self.app(scope, _BoundedReceive(receive, limit, s.body_timeout_s, counted), send)


# A JSON body's cost is in its values, not its bytes: 8 MB of `[[0]],` took 3 s of the event loop
# to parse and walk and a gigabyte to hold. Arrays, objects and separators are counted as the body
# arrives (base64 has none of these bytes); real bodies hold a few thousand (a large ComfyUI
# workflow with its UI graph ~20k). File uploads and raw bytes are not counted.
MAX_BODY_TOKENS = 100_000
BINARY_BODIES = (b"multipart/", b"application/octet-stream", b"image/")


def body_limit(length: bytes | str | None, max_body: int, max_chunked: int) -> tuple[int, bool]:
    """(the most body bytes a request may send, whether its Content-Length already passes that).
    Without a Content-Length the size is unknown until read, and a refused body would have been
    buffered up to the limit: such bodies get the smaller chunked limit."""
    if length is None:
        return min(max_body, max_chunked), False
    return max_body, length.isdigit() and int(length) > max_body


def too_large(limit: int) -> str:
    return (
        f"the request body is larger than the service's limit of {limit} bytes (KDIFF_MAX_BODY_BYTES; "
        "KDIFF_MAX_CHUNKED_BYTES for a body sent without Content-Length)"
    )


class _BoundedReceive:
    """``receive`` that raises 413 past ``limit`` body bytes (or, ``counted``, past MAX_BODY_TOKENS
    JSON brackets and commas) and 408 when the whole body takes longer than ``timeout_s`` (FastAPI
    passes HTTPExceptions raised while reading the body through)."""

    def __init__(self, receive: Receive, limit: int, timeout_s: float, counted: bool = False) -> None:
        self.receive, self.limit, self.timeout_s, self.counted = receive, limit, timeout_s, counted
        self.seen = self.tokens = 0
        self.deadline: float | None = None
        self.done = False

    async def __call__(self) -> Message:
        if self.done:
            return await self.receive()  # body complete: the next message is the disconnect, untimed
        if self.deadline is None:
            self.deadline = time.monotonic() + self.timeout_s
        try:
            message = await asyncio.wait_for(self.receive(), max(0.0, self.deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise HTTPException(
                408,
                f"the request body did not arrive within {self.timeout_s:g} s (KDIFF_BODY_TIMEOUT_S)",
                headers={"Connection": "close"},
            ) from None
        if message["type"] == "http.request":
            body = message.get("body", b"")
            self.seen += len(body)
            if self.seen > self.limit:
                raise HTTPException(413, too_large(self.limit), headers={"Connection": "close"})
            if self.counted:
                self.tokens += body.count(b"[") + body.count(b"{") + body.count(b",")
                if self.tokens > MAX_BODY_TOKENS:
                    raise HTTPException(
                        413,
                        f"the request body holds over {MAX_BODY_TOKENS} JSON arrays, objects and items",
                        headers={"Connection": "close"},
                    )
            self.done = not message.get("more_body", False)
        return message

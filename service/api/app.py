"""The FastAPI app factory: lifespan (load models, start engines, drain), error handlers, middleware."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import image_gate
from service.engine import Metrics
from service.models.store import ModelStore
from service.sampling.errors import InputError
from service.serving.service import Service

from . import comfy as comfy_api
from . import playground
from .compat.routers import ROUTERS as COMPAT_ROUTERS
from .guard import GuardMiddleware, HTTPMiddleware, error_body
from .metrics_labels import method_label, route_label
from .routes import info, jobs, models, sample, upscale
from .schemas import SampleRequest
from .settings import Settings

DESCRIPTION = """k-diffusion samplers behind an HTTP API. Every request runs through one engine per
model that batches the model evaluations of all running requests at every sampler step."""


class MetricsMiddleware(HTTPMiddleware):
    """Counts HTTP requests by route template, method and status, each from a fixed set
    (metrics_labels.py; pure ASGI: streaming-safe)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        super().__init__(app)
        self.metrics = metrics

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            labels = route_label(scope), method_label(scope["method"]), str(status["code"])
            self.metrics.requests.labels(*labels).inc()


def _field_error(
    field: str, message: str, allowed: list[Any] | None, kind: str = "value_error"
) -> dict[str, Any]:
    err: dict[str, Any] = {"loc": ["body", field], "msg": message, "type": kind}
    if allowed is not None:
        err["allowed"] = allowed
    return err


async def _on_field_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InputError)
    return JSONResponse({"detail": [_field_error(exc.field, exc.message, exc.allowed)]}, status_code=422)


MAX_ERRORS = 20


def _echo(value: Any, limit: int = 200) -> Any:
    """The offending input as strict JSON can carry it: a raw non-JSON body arrives as bytes, NaN and
    infinities (which Python's JSON parser accepts) become their text, and a huge value is cut, so the
    422 itself never fails or balloons."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        value = text = repr(value)
    if len(text) <= limit:
        return value
    return (value if isinstance(value, str) else text)[:limit] + "..."


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 body, with unknown fields named together with the allowed ones."""
    assert isinstance(exc, RequestValidationError)
    allowed = sorted(SampleRequest.model_fields)
    errors = []
    raw = exc.errors()
    for err in raw[:MAX_ERRORS]:  # a 5,000-item list of bad seeds is 5,000 errors: list the first few
        err = {k: v for k, v in err.items() if k in ("loc", "msg", "type", "input", "ctx")}
        if err.get("type") == "extra_forbidden":
            name = err["loc"][-1]
            err["msg"] = f"unknown field {name!r}; allowed fields: {', '.join(allowed)}"
            err["allowed"] = allowed
            err.pop("input", None)
        if "ctx" in err:
            err["ctx"] = {k: str(v) for k, v in err["ctx"].items()}
        err["loc"] = [p if isinstance(p, int) else str(p) for p in err.get("loc", ())]
        if "input" in err:
            err["input"] = _echo(err["input"])
        errors.append(err)
    if len(raw) > MAX_ERRORS:
        more = len(raw) - MAX_ERRORS
        errors.append({"loc": ["body"], "msg": f"... and {more} more errors", "type": "too_many_errors"})
    return JSONResponse({"detail": errors}, status_code=422)


BODY_UNPARSED = "There was an error parsing the body"  # FastAPI's, raised from the parser's error


def _unparsed(cause: BaseException) -> dict[str, Any]:
    """What FastAPI's bare "error parsing the body" hides, in the routes' 422 item shape: a body
    that is not UTF-8 (gzip, Latin-1), nested too deep, or an integer of over 4,300 digits."""
    if isinstance(cause, UnicodeDecodeError):
        msg = f"the body is not UTF-8 JSON ({cause.reason} at byte {cause.start}; is it compressed?)"
    elif isinstance(cause, RecursionError):
        msg = "the body's JSON is nested too deep"
    else:
        msg = f"the body could not be parsed: {_echo(str(cause))}"
    return {"loc": ["body"], "msg": msg, "type": "body_unparsed"}


async def _on_http_error(request: Request, exc: Exception) -> Response:
    """The router's own errors (no such path, method not allowed) under /v1 in OpenAI's shape, as
    OpenAI answers them: its clients read ``error.message``. The routes' errors are shaped by their
    route class (compat/errors.py); other paths keep FastAPI's ``{"detail"}``."""
    assert isinstance(exc, HTTPException)
    path = request.url.path
    if not path.startswith("/v1/"):
        cause = exc.__cause__
        if exc.status_code == 400 and exc.detail == BODY_UNPARSED and cause is not None:
            return JSONResponse({"detail": [_unparsed(cause)]}, status_code=400)
        return await http_exception_handler(request, exc)
    message = str(exc.detail)
    if exc.status_code == 404 and exc.detail == "Not Found":  # the router's, not a route's own 404
        message = f"Invalid URL ({request.method} {path})"
    body = error_body(path, exc.status_code, message)
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


def create_app(settings: Settings | None = None, store: ModelStore | None = None) -> FastAPI:
    """Build the app; models load in the lifespan, not here."""
    settings = settings or Settings()
    image_gate.set_max_pixels(settings.max_image_pixels)
    state = Service(settings, store)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await state.startup()
        except Exception as exc:
            app.state.startup_error = exc  # `kdiff serve` says it in one line (service/api/cli.py)
            raise
        try:
            yield
        finally:
            await comfy_front.close()
            await state.shutdown()

    app = FastAPI(
        title="kdiffusion-service",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served offline by the playground (no CDN)
        redoc_url=None,
    )
    app.state.service = state
    app.add_exception_handler(InputError, _on_field_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.include_router(sample.router)
    app.include_router(jobs.router)
    app.include_router(models.router)
    app.include_router(info.catalogue)
    app.include_router(info.router)
    app.include_router(upscale.router)
    playground.install(app)  # the web page at /, and /docs + /redoc with local assets
    for router in COMPAT_ROUTERS:  # A1111 and OpenAI frontends (service/api/compat)
        app.include_router(router)
    comfy_front = comfy_api.install(app, state, settings)  # ComfyUI's API (service/api/comfy)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["Retry-After", "X-Job-Id", "X-Seeds"],
        )
    app.add_middleware(GuardMiddleware, settings=settings)  # inside CORS: preflights need no key
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    return app

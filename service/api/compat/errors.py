"""Error bodies in each frontend's own shape, by route class (our API's handlers stay as they are).

- A1111: FastAPI's validation list under ``detail`` (what A1111 answers for a body that does not
  parse) plus A1111's own keys ``error``, ``body``, ``errors`` (what its exception handler adds).
- OpenAI: ``{"error": {"message", "type", "param", "code"}}``; invalid input is 400 as OpenAI
  answers it, not 422.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.exceptions import HTTPException  # FastAPI raises this base class for unparsable bodies

from service.sampling.errors import InputError

Handler = Callable[[Request], Coroutine[Any, Any, Response]]
MAX_ERRORS = 20


def _validation_items(exc: RequestValidationError) -> list[dict[str, Any]]:
    out = []
    for err in exc.errors()[:MAX_ERRORS]:
        item = {k: err[k] for k in ("loc", "msg", "type") if k in err}
        item["loc"] = list(item.get("loc", []))
        out.append(item)
    return out


def body_error(exc: HTTPException) -> str | None:
    """What was wrong with a body FastAPI could not parse (it says only 'error parsing the body')."""
    cause = exc.__cause__
    if exc.status_code != 400 or cause is None:
        return None
    if isinstance(cause, UnicodeDecodeError):
        return "the body is not UTF-8 text (JSON bodies must be UTF-8)"
    if isinstance(cause, RecursionError):
        return "the body is nested too deeply to parse"
    return f"the body could not be parsed ({type(cause).__name__})"


def _message(detail: Any) -> str:
    if isinstance(detail, dict):
        return str(detail.get("message", detail))
    return str(detail)


def a1111_error(status: int, error: str, detail: Any, errors: str = "") -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail, "body": "", "errors": errors}, status_code=status)


class FrontendRoute(APIRoute):
    """A route whose errors answer in its frontend's shape: a subclass renders each kind of error
    (``own_errors``: the frontend's own exception types, rendered by ``own_error``)."""

    own_errors: tuple[type[Exception], ...] = ()

    def get_route_handler(self) -> Handler:
        inner = super().get_route_handler()

        async def handler(request: Request) -> Response:
            try:
                return await inner(request)
            except RequestValidationError as exc:
                return self.validation_error(exc)
            except InputError as exc:
                return self.field_error(exc)
            except self.own_errors as exc:
                return self.own_error(exc)
            except ValidationError as exc:  # a translated request our own schema refuses
                return self.validation_error(RequestValidationError(exc.errors()))
            except HTTPException as exc:
                resp = self.http_error(exc)
                resp.headers.update(exc.headers or {})
                return resp

        return handler

    def validation_error(self, exc: RequestValidationError) -> JSONResponse:
        raise NotImplementedError

    def field_error(self, exc: InputError) -> JSONResponse:
        raise NotImplementedError

    def own_error(self, exc: Exception) -> JSONResponse:
        raise NotImplementedError

    def http_error(self, exc: HTTPException) -> JSONResponse:
        raise NotImplementedError


class A1111Route(FrontendRoute):
    """Errors of /sdapi/v1 routes in A1111's shape."""

    def validation_error(self, exc: RequestValidationError) -> JSONResponse:
        items = _validation_items(exc)
        text = "; ".join(f"{'.'.join(map(str, i['loc']))}: {i['msg']}" for i in items)
        return a1111_error(422, "RequestValidationError", items, text)

    def field_error(self, exc: InputError) -> JSONResponse:
        item = {"loc": ["body", exc.field], "msg": exc.message, "type": "value_error"}
        if exc.allowed is not None:
            item["allowed"] = exc.allowed
        return a1111_error(422, "FieldError", [item], f"{exc.field}: {exc.message}")

    def http_error(self, exc: HTTPException) -> JSONResponse:
        text = body_error(exc)
        if text is not None:
            return a1111_error(400, "HTTPException", text, text)
        return a1111_error(exc.status_code, "HTTPException", exc.detail, _message(exc.detail))


OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "conflict_error",
    429: "rate_limit_error",
    503: "server_error",
    504: "server_error",
}


def openai_error(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    kind = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class OpenAIRoute(FrontendRoute):
    """Errors of /v1 routes in OpenAI's shape and statuses."""

    own_errors = (OpenAIError,)

    def validation_error(self, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": ["body"], "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", []) if p != "body"]
        param = ".".join(loc) or None
        return openai_error(400, f"{param or 'body'}: {first.get('msg')}", param, "invalid_value")

    def field_error(self, exc: InputError) -> JSONResponse:
        return openai_error(400, exc.message, exc.field, "invalid_value")

    def own_error(self, exc: Exception) -> JSONResponse:
        assert isinstance(exc, OpenAIError)
        return openai_error(exc.status, exc.message, exc.param, exc.code)

    def http_error(self, exc: HTTPException) -> JSONResponse:
        text = body_error(exc)
        if text is not None:
            return openai_error(400, text, None, "invalid_json")
        code = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(exc.status_code)
        return openai_error(exc.status_code, _message(exc.detail), None, code)

"""The web playground at ``/`` and offline ``/docs`` + ``/redoc``.

The page is static files (``static/``: HTML, CSS, ES modules; no build step) that call the API with
relative URLs, so it works behind a path prefix. Swagger UI and ReDoc load their scripts from the
``fastapi-offline`` package's copies (Swagger UI: Apache-2.0, ReDoc: MIT) instead of a CDN, so the
docs render on a host without internet access. The page and its assets are open without a key (the
page has a key field); the docs pages keep their own rule (guard.py, ``KDIFF_PUBLIC_DOCS``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
VENDOR = Path(fastapi_offline.__file__).parent / "static"
PREFIX = "/playground"  # static assets; guard.py leaves paths under it open
# relative to /docs and /redoc, so a path prefix in front of the service is kept
OPENAPI, ASSETS = "openapi.json", "playground/vendor"
FAVICON = f"{ASSETS}/favicon.png"
# ReDoc's footer shows its vendor's logo from a CDN (hidden when it fails): an empty local image instead
REDOC_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"
EMPTY_SVG = b"data:image/svg+xml,<svg xmlns='http://www.w3.org/2000/svg'/>"


@cache
def _redoc_js() -> bytes:
    return (VENDOR / "redoc.standalone.js").read_bytes().replace(REDOC_LOGO, EMPTY_SVG)


def install(app: FastAPI) -> None:
    """Serve the page at ``/``, its assets under ``/playground/``, and the offline docs pages. The app
    must be created with ``docs_url=None, redoc_url=None`` (these routes replace FastAPI's)."""

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    def docs_page(path: str, name: str, render: Callable[..., HTMLResponse], **options: Any) -> None:
        """FastAPI's docs page ``render`` at ``path``: the schema, the title ``name``, ``options``."""

        async def page() -> HTMLResponse:
            return render(openapi_url=OPENAPI, title=f"{app.title} - {name}", **options)

        app.add_api_route(path, page, methods=["GET"], include_in_schema=False, name=name)

    docs_page(
        "/docs",
        "Swagger UI",
        get_swagger_ui_html,
        swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{ASSETS}/swagger-ui.css",
        swagger_favicon_url=FAVICON,
        oauth2_redirect_url=None,  # no OAuth2 flows here (keys are Bearer/Basic)
    )
    docs_page(
        "/redoc",
        "ReDoc",
        get_redoc_html,
        redoc_js_url=f"{ASSETS}/redoc.standalone.js",
        redoc_favicon_url=FAVICON,
        with_google_fonts=False,
    )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(f"{PREFIX}/vendor/redoc.standalone.js", include_in_schema=False)
    async def redoc_js() -> Response:
        return Response(_redoc_js(), media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})

    app.mount(f"{PREFIX}/vendor", StaticFiles(directory=VENDOR), name="playground-vendor")
    app.mount(PREFIX, StaticFiles(directory=STATIC), name="playground")

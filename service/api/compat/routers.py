"""All compatibility routers, for the app factory: ``for r in ROUTERS: app.include_router(r)``."""

from __future__ import annotations

from fastapi import APIRouter

from . import a1111, a1111_controlnet, a1111_extras, a1111_info, openai

ROUTERS: list[APIRouter] = [
    a1111_info.router,
    a1111.router,
    a1111_extras.router,
    a1111_controlnet.router,
    openai.router,
]

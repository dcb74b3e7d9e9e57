"""ComfyUI's API (``/prompt``, ``/history``, ``/view``, ``/ws``, ...) over the workflow executor of
``service.comfy``: ``install(app, service, settings)`` adds the routes and the per-key state."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from .files import ComfyFiles
from .front import ComfyFront
from .history_store import HistoryStore
from .routes import router
from .ws import router as ws_router


def install(app: FastAPI, service: Any, settings: Any, comfy: Any = None) -> ComfyFront:
    """Add the ComfyUI routes; ``comfy``: the executor (default ``service.comfy.Comfy(service)``).
    Call the returned front's ``close()`` at shutdown (stops running prompts, removes a temporary
    file folder)."""

    def make_comfy() -> Any:
        if comfy is not None:
            return comfy
        from service.comfy import Comfy

        return Comfy(service)

    files = ComfyFiles(settings.comfy_dir, settings.comfy_max_files, settings.comfy_max_bytes)
    db = getattr(service, "state_db", None)  # KDIFF_STATE_DIR: the history outlives a restart
    store = HistoryStore(db) if db is not None else None
    front = ComfyFront(make_comfy, files, settings.comfy_max_history, settings.comfy_max_prompts, store)
    app.state.comfy = front
    app.include_router(router)
    app.include_router(ws_router)
    return front

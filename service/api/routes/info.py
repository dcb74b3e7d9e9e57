"""What may be asked for (samplers, schedules; models are in routes/models.py), health, readiness
and metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.models.tuned import catalogue_entry as tuned_entry
from service.sampling import registry
from service.sampling.request import CUSTOM
from service.serving.service import Service

from ..deps import get_state, require_api_key

router = APIRouter(tags=["info"])
# The catalogue needs a key like the rest of the API; the probes below are open (see guard.py).
catalogue = APIRouter(tags=["info"], dependencies=[Depends(require_api_key)])


@catalogue.get("/samplers")
async def samplers() -> dict[str, Any]:
    """Every sampler with its options: default, type and bounds (or choices)."""
    return {"samplers": [info.describe() for info in registry.SAMPLERS.values()]}


@catalogue.get("/schedules")
async def schedules(state: Service = Depends(get_state)) -> dict[str, Any]:
    """Every sigma schedule with its options: default, type and bounds."""
    custom = {
        "name": CUSTOM,
        "doc": "your own descending sigmas, sent in the request's `sigmas` field (they set steps)",
        "needs_discrete": False,
        "uses_sigma_range": False,
        "options": {},
    }
    folders = {
        n: (state.pool.manifests.get(n) or state.pool.models[n].manifest).folder for n in state.pool.known()
    }
    return {"schedules": [*(i.describe() for i in registry.SCHEDULES.values()), custom, tuned_entry(folders)]}


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Alive (the process answers)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "loading models, or draining"}})
async def readyz(state: Service = Depends(get_state)) -> JSONResponse:
    """Ready: models loaded and not draining."""
    body = {"ready": state.ready, "draining": state.draining, "models": sorted(state.pool.models)}
    return JSONResponse(body, status_code=200 if state.ready else 503)


@router.get("/metrics", response_class=Response)
async def metrics(state: Service = Depends(get_state)) -> Response:
    """Prometheus metrics."""
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

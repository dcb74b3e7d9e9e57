"""Models: the store's models and their state (GET /models), and loading, unloading and rescanning
them at run time (admin routes)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, HTTPException

from service.models.stepcache.support import cache_methods
from service.models.store import disk_bytes
from service.serving.errors import ModelUnavailable
from service.serving.service import Service

from ..deps import get_state, require_api_key
from ..errors import http_error
from ..guard import Caller

router = APIRouter(tags=["models"], dependencies=[Depends(require_api_key)])


async def require_admin(caller: Caller = Depends(require_api_key)) -> Caller:
    """Management routes: an admin key when keys are set (KDIFF_ADMIN_KEYS)."""
    if not caller.admin:
        raise HTTPException(403, "managing models needs an admin key (KDIFF_ADMIN_KEYS)")
    return caller


def describe(state: Service, name: str) -> dict[str, Any]:
    """One model: state, kind, size on disk and memory use; what it takes once loaded."""
    manifest = state.pool.manifest(name)
    out: dict[str, Any] = {
        "name": name,
        "kind": manifest.kind,
        "description": manifest.description,
        "default": name == state.pool.default_model,
        "state": state.pool.model_state(name),
        "size_bytes": disk_bytes(manifest) if manifest.folder.is_dir() else None,
        "memory_bytes": state.pool.footprint.weight.get(name, 0),
        "defaults": manifest.defaults,
        "tuned_schedules": manifest.tuned_schedules(),
    }
    if name in state.pool.load_errors:
        out["error"] = state.pool.load_errors[name]
    m = state.pool.models.get(name)
    if m is not None:
        h, w = m.image_size
        out |= {
            "conditioning": m.conditioning,
            "class_labels": m.class_labels,
            "width": w,
            "height": h,
            "channels": m.image_channels,
            "latent_shape": list(m.latent_shape),
            "device": str(m.device),
            "dtype": str(m.dtype).removeprefix("torch."),
            # the optional conditioning fields its requests take (controlnets, SDXL's crops, ...)
            "conditioning_fields": sorted(m.conditioning_fields()),
            # the step cache methods its network runs (a request's cache.method; docs/STEP_CACHE.md)
            "cache_methods": list(cache_methods(m.denoiser)),
            # a discrete-time model (a sigma table): runs the schedules GET /schedules marks needs_discrete
            "discrete": getattr(m.denoiser, "sigmas", None) is not None,
            **m.info,
        }
    return out


@router.get("/models")
async def models(state: Service = Depends(get_state)) -> dict[str, Any]:
    """Every model in the store: state (on_disk | loading | loaded | failed), kind, size on disk,
    memory use; for loaded ones also conditioning, image size, defaults."""
    budget = state.pool.footprint.budget
    used = sum(state.pool.footprint.weight.values())
    return {
        "default": state.pool.default_model,
        "memory": {"budget_bytes": budget, "used_bytes": used},
        "models": [describe(state, name) for name in state.pool.known()],
        "errors": state.pool.manifest_errors,
    }


@router.post("/models/refresh", dependencies=[Depends(require_admin)])
async def refresh(state: Service = Depends(get_state)) -> dict[str, Any]:
    """Rescan the store: new model folders appear without a restart."""
    state.pool.refresh()
    return await models(state)


@router.post("/models/{name}/load", dependencies=[Depends(require_admin)])
async def load(name: str, state: Service = Depends(get_state)) -> dict[str, Any]:
    """Load a model now (idle models are unloaded, least recently used first, to fit the budget)."""
    try:
        await state.pool.ensure_loaded(name)
    except ModelUnavailable as exc:
        raise http_error(exc) from exc
    return describe(state, name)


@router.post("/models/{name}/unload", dependencies=[Depends(require_admin)])
async def unload(name: str, state: Service = Depends(get_state)) -> dict[str, Any]:
    """Unload an idle model (409 while it has jobs); it stays in the store and loads again on use."""
    if name not in state.pool.known():
        raise HTTPException(404, f"unknown model {name!r}; models: {state.pool.known()}")
    try:
        await state.pool.unload(name)
    except ModelUnavailable as exc:
        raise http_error(exc) from exc
    return describe(state, name)


@router.get("/embeddings")
@router.get("/api/embeddings")
async def embeddings(state: Service = Depends(get_state)) -> list[str]:
    """Textual-inversion embedding files (ComfyUI's list of names, at ComfyUI's path too):
    `model_store/embeddings/` (any model whose text width fits) and `model_store/<model>/embeddings/`.
    Use them by name in prompts (A1111) or as `embedding:name` (ComfyUI); `GET /sdapi/v1/embeddings`
    says which fit a model and why others do not."""
    return await asyncio.to_thread(state.pool.embeddings.comfy_names)


@router.get("/loras")
async def loras(state: Service = Depends(get_state)) -> dict[str, Any]:
    """LoRA files in the store: `model_store/loras/` (any model whose layers they fit) and
    `model_store/<model>/loras/` (that model). Use them with `loras: [{"name", "weight"}]` or
    `<lora:name:weight>` in the prompt."""
    found = await asyncio.to_thread(state.pool.loras.scan)  # a folder of thousands: not on the loop
    return {
        "loras": [
            {"name": i.name, "base_model": i.base_model, "size_bytes": i.size_bytes, "file": i.path.name}
            for i in found
        ]
    }

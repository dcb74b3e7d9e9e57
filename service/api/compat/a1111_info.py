"""A1111's listing routes: what we serve, in A1111's shapes; lists we cannot fill are empty."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import torch
from fastapi import APIRouter, Depends

from service import a1111_names
from service.models.embeddings import embedding_catalog
from service.models.upscalers import LATENT_UPSCALE_MODES
from service.serving.service import Service

from ..deps import get_state, require_api_key
from . import a1111_translate
from .a1111_scripts import RUN
from .caller import CompatCall, compat_caller
from .errors import A1111Route

router = APIRouter(
    prefix="/sdapi/v1", tags=["a1111"], dependencies=[Depends(require_api_key)], route_class=A1111Route
)


@router.get("/sd-models")
async def sd_models(state: Service = Depends(get_state)) -> list[dict[str, Any]]:
    """Every model in the store, loaded or not (one that is not loads on its first request); the
    title is the model name (what sd_model_checkpoint takes)."""
    return [
        {
            "title": name,
            "model_name": name,
            "hash": None,
            "sha256": None,
            "filename": str(state.pool.manifest(name).folder),
            "config": None,
        }
        for name in state.pool.known()
    ]


@router.get("/samplers")
async def samplers() -> list[dict[str, Any]]:
    return a1111_names.sampler_items()


@router.get("/schedulers")
async def schedulers() -> list[dict[str, Any]]:
    return a1111_names.scheduler_items()


@router.get("/upscalers")
async def upscalers(state: Service = Depends(get_state)) -> list[dict[str, Any]]:
    """The plain resizes, then every model file in model_store/upscalers/ (A1111's UpscalerItem: the
    file's name, its family, path and own scale; read from the file's keys, off the loop)."""
    items = await state.pool.upscalers.call(state.pool.upscalers.items)
    return [
        {
            "name": i.name,
            "model_name": i.family,
            "model_path": str(i.path) if i.path else None,
            "model_url": None,
            "scale": i.scale,
        }
        for i in items
    ]


@router.get("/latent-upscale-modes")
async def latent_upscale_modes() -> list[dict[str, Any]]:
    """A1111's latent upscale modes (the hires fix's ``hr_upscaler`` also takes them)."""
    return [{"name": name} for name in LATENT_UPSCALE_MODES]


def _empty() -> list[Any]:
    return []


for _path in (
    "/sd-vae",
    "/sd-modules",
    "/hypernetworks",
    "/face-restorers",
    "/realesrgan-models",
    "/prompt-styles",
    "/extensions",
):
    router.add_api_route(_path, _empty, methods=["GET"], name=_path.strip("/"))


@router.get("/loras")
async def loras(state: Service = Depends(get_state)) -> list[dict[str, Any]]:
    """The store's LoRAs as A1111 lists them (use them with <lora:name:weight> in the prompt)."""
    found = await asyncio.to_thread(state.pool.loras.scan)  # a folder of thousands: not on the loop
    return [
        {"name": i.name, "alias": i.name, "path": i.path.name, "metadata": {"base_model": i.base_model}}
        for i in found
    ]


@router.get("/embeddings")
async def embeddings(call: CompatCall = Depends(compat_caller)) -> dict[str, Any]:
    """The textual-inversion embeddings of the caller's model (its sd_model_checkpoint, loaded if it is
    not), as A1111 lists them: ``loaded`` (usable by name in prompts) and ``skipped`` (another width,
    or a file that cannot be read: ``reason`` says which)."""
    pool = call.state.pool
    name = a1111_translate.model_name(
        str(call.options().get("sd_model_checkpoint") or call.default_model), pool.known()
    )
    async with call.model(name) as model:
        return await asyncio.to_thread(embedding_catalog(model, pool.embeddings).listing)


@router.post("/refresh-embeddings")
async def refresh_embeddings(state: Service = Depends(get_state)) -> None:
    """Read every embedding file again (new and changed files are also picked up on their own)."""
    await asyncio.to_thread(state.pool.embeddings.refresh)


@router.get("/scripts")
async def scripts() -> dict[str, list[str]]:
    """The scripts that run here, by A1111's lower-case names (a1111_scripts.py): ControlNet's."""
    return {"txt2img": list(RUN), "img2img": list(RUN)}


@router.get("/cmd-flags")
async def cmd_flags(state: Service = Depends(get_state)) -> dict[str, Any]:
    return {
        "api": True,
        "nowebui": True,
        "api_auth": None,
        "listen": None,
        "ckpt_dir": None,
        "lowvram": False,
        "medvram": False,
        "no_half": state.settings.resolve_dtype(state.settings.resolve_device()) == "float32",
    }


@router.get("/memory")
async def memory() -> dict[str, Any]:
    ram: dict[str, Any] = {}
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total, free = os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
        ram = {"free": free, "used": total - free, "total": total}
    except (ValueError, OSError, AttributeError):
        ram = {"error": "unavailable"}
    cuda: dict[str, Any] = {"error": "unavailable"}
    if torch.cuda.is_available():
        free_b, total_b = torch.cuda.mem_get_info()
        cuda = {
            "system": {"free": free_b, "used": total_b - free_b, "total": total_b},
            "active": {"current": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated()},
        }
    return {"ram": ram, "cuda": cuda}


def _null() -> None:
    return None


for _path in (
    "/refresh-checkpoints",
    "/refresh-vae",
    "/refresh-loras",
    "/unload-checkpoint",
    "/reload-checkpoint",
):
    router.add_api_route(_path, _null, methods=["POST"], name=_path.strip("/"))

"""The workflow half of ComfyUI's API for the HTTP routes: ``object_info``, model folders,
``validate`` and ``run`` over the node classes of this package (see docs/COMFYUI.md)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from service.models.controlnet import scan as scan_controlnets
from service.sampling import aliases, registry

from . import (  # noqa: F401  (each registers its nodes)
    nodes_cache,
    nodes_clip_prep,
    nodes_control,
    nodes_image,
    nodes_ipadapter,
    nodes_model,
    nodes_sampling,
)
from .executor import OutputCache, Run, RunResult
from .node import REGISTRY, Catalog, Node
from .nodes_model import model_name
from .runtime import ComfyContext
from .sample import resolve_sampler
from .validate import Validation, validate

if TYPE_CHECKING:
    from service.serving.service import Service

NODES: dict[str, type[Node]] = REGISTRY  # filled by the node modules imported above
# ComfyUI's KSampler list (comfy/samplers.py SAMPLER_NAMES), first and in its order: all resolve to ours
COMFY_SAMPLERS = tuple(
    """
    euler euler_cfg_pp euler_ancestral euler_ancestral_cfg_pp heun heunpp2 dpm_2 dpm_2_ancestral
    lms dpm_fast dpm_adaptive dpmpp_2s_ancestral dpmpp_2s_ancestral_cfg_pp dpmpp_sde dpmpp_sde_gpu
    dpmpp_2m dpmpp_2m_cfg_pp dpmpp_2m_sde dpmpp_2m_sde_gpu dpmpp_3m_sde dpmpp_3m_sde_gpu ddpm lcm
    ipndm ipndm_v deis res_multistep res_multistep_cfg_pp res_multistep_ancestral
    res_multistep_ancestral_cfg_pp gradient_estimation er_sde seeds_2 seeds_3 ddim uni_pc
    uni_pc_bh2
    """.split()
)
# ComfyUI's SCHEDULER_NAMES, first and in its order
COMFY_SCHEDULERS = tuple(
    "normal karras exponential sgm_uniform simple ddim_uniform beta linear_quadratic kl_optimal".split()
)
# Schedules that are ours alone, not a ComfyUI scheduler name (a request's own sigmas, tuned tables)
_NOT_SCHEDULERS = frozenset({"custom", "tuned"})


def _resolves(fn: Any) -> Any:
    def check(name: str) -> bool:
        try:
            fn(name)
        except registry.UnknownNameError:
            return False
        return True

    return check


def _models_of(pool: Any) -> Any:
    """Whether a checkpoint value names a model: the store is rescanned at most once per catalog
    (a new folder appears without a restart; a workflow of unknown names costs one scan, not one each)."""
    known = set(pool.known())
    rescanned = False

    def check(value: str) -> bool:
        nonlocal known, rescanned
        name = model_name(value)
        if name not in known and not rescanned:
            rescanned = True
            pool.refresh()
            known = set(pool.known())
        return name in known

    return check


def _listed(comfy: tuple[str, ...], ours: set[str]) -> tuple[str, ...]:
    """ComfyUI's names in its order, then our further ones."""
    return (*comfy, *sorted(ours - set(comfy)))


class Comfy:
    """One per app: the node classes, the output cache, and the service they run on."""

    def __init__(self, service: Service, cache: OutputCache | None = None) -> None:
        self.service = service
        self.cache = cache or OutputCache()

    def catalog(self, ctx: ComfyContext | None = None) -> Catalog:
        pool, settings = self.service.pool, self.service.settings
        loras = sorted({info.name for info in pool.loras.scan()})
        return Catalog(
            models=tuple(pool.known()),
            samplers=_listed(COMFY_SAMPLERS, set(registry.SAMPLERS)),
            schedules=_listed(COMFY_SCHEDULERS, set(registry.SCHEDULES) - _NOT_SCHEDULERS),
            loras=tuple(loras),
            controlnets=tuple(sorted(scan_controlnets(pool.store.root))),
            **nodes_ipadapter.catalog_fields(pool.store.root),  # models/ipadapter, clip_vision
            inputs=tuple(ctx.list_inputs()) if ctx is not None else (),
            max_batch=int(settings.max_images),
            max_steps=int(settings.max_steps),
            resolves_sampler=_resolves(resolve_sampler),
            resolves_schedule=_resolves(aliases.resolve_schedule),
            resolves_model=_models_of(pool),
        )

    def object_info(self, ctx: ComfyContext | None = None) -> dict[str, Any]:
        """GET /object_info: every node class in ComfyUI's shape."""
        catalog = self.catalog(ctx)
        return {name: cls.describe(catalog) for name, cls in NODES.items()}

    def object_info_one(self, name: str, ctx: ComfyContext | None = None) -> dict[str, Any]:
        """GET /object_info/{class}: ``{class: {...}}``, or ``{}`` for an unknown class (as ComfyUI)."""
        cls = NODES.get(name)
        return {} if cls is None else {name: cls.describe(self.catalog(ctx))}

    def model_folders(self) -> dict[str, list[str]]:
        """GET /models (the keys) and /models/{folder} (the names): our models stand in every model
        folder a loader node reads; LoRAs in ``loras``."""
        catalog = self.catalog()
        models = list(catalog.models)
        folders = ("checkpoints", "diffusion_models", "unet", "vae", "clip", "text_encoders")
        out = {f: models for f in folders}
        out |= {"loras": list(catalog.loras), "embeddings": [], "upscale_models": []}
        out["controlnet"] = list(catalog.controlnets)
        out |= {"ipadapter": list(catalog.ipadapters), "clip_vision": list(catalog.clip_vision)}
        return out

    def validate(self, prompt: Any, ctx: ComfyContext | None = None) -> Validation:
        """ComfyUI's validate_prompt: never raises."""
        return validate(prompt, NODES, self.catalog(ctx))

    async def run(self, prompt: Any, prompt_id: str, ctx: ComfyContext) -> RunResult:
        """Validate and run ``prompt`` for ``ctx``'s owner; never raises (bar CancelledError)."""
        v = await asyncio.to_thread(self.validate, prompt, ctx)  # disk scans, base64 headers
        original = prompt if isinstance(prompt, dict) else {}
        return await Run(self.service, NODES, self.cache, prompt_id, ctx, original).execute(v)

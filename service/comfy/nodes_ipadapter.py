"""IP-Adapter nodes as workflows send them: cubiq's ComfyUI_IPAdapter_plus (IPAdapterUnifiedLoader,
IPAdapterModelLoader, IPAdapter, IPAdapterAdvanced) and core ComfyUI's CLIPVisionLoader, with their
class names, inputs, defaults and bounds.

Applying an adapter puts one image on the MODEL (``ModelRef.ip_adapters``); the sampler turns them into
the request's ``ip_adapters`` (``service/models/ipadapter``): weight is the unit's weight, start_at /
end_at its guidance_start / guidance_end, the image's first frame the reference image, so an
IP-Adapter workflow is ``/sample`` with those units and shares UNet calls with all other traffic.
Chained IPAdapter nodes add one unit each (at most ``MAX_ADAPTERS``).

What has no equal in our units is refused with a node error listing what is served, never ignored:
weight types other than linear ("standard" on the simple node), embeds scaling other than "V only",
attention masks, negative images, a batch of reference images (chain one node per image).
``combine_embeds`` only acts on a batch, so with one image every value is the same image.

Each IPAdapter node resolves its adapter on the sampler's model and encodes the image when it runs
(the tokens are kept for the sampler), so a file for another base model, an encoder that does not
fit, or an image the gate refuses fails at that node, naming the input.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from torch import Tensor

from service.image_gate import GatedImage
from service.models.ipadapter import MAX_ADAPTERS, ImageAdapters
from service.sampling.errors import InputError
from service.serving.request import IPAdapterRef

from . import ipadapter_names as names
from .node import DISPLAY_NAMES, Catalog, Enum, Float, In, Node, node
from .runtime import NodeRun, image_to_pil
from .values import ClipVisionRef, IPAdapterPipe, IPAdapterUnit, ModelRef

MODEL, IPADAPTER, IMAGE = In("MODEL"), In("IPADAPTER"), In("IMAGE")
PERCENT = {"start_at": Float(0.0, 0.0, 1.0, 0.001), "end_at": Float(1.0, 0.0, 1.0, 0.001)}
# IPAdapterPlus.py's lists, in its order
WEIGHT_TYPES = (
    "linear",
    "ease in",
    "ease out",
    "ease in-out",
    "reverse in-out",
    "weak input",
    "weak output",
    "weak middle",
    "strong middle",
    "style transfer",
    "composition",
    "strong style transfer",
    "style and composition",
    "style transfer precise",
    "composition precise",
)
SIMPLE_WEIGHT_TYPES = ("standard", "prompt is more important", "style transfer")
COMBINE = ("concat", "add", "subtract", "average", "norm average")
SCALING = ("V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty")
WHY = {
    "weight_type": "per-layer and per-block weights have no equal in our IP-Adapter units (one weight "
    "on every cross-attention)",
    "embeds_scaling": "only the image attention's output is scaled (diffusers' and A1111's IP-Adapter)",
}

DISPLAY_NAMES.update(
    {
        "IPAdapter": "IPAdapter",
        "IPAdapterAdvanced": "IPAdapter Advanced",
        "IPAdapterUnifiedLoader": "IPAdapter Unified Loader",
        "IPAdapterModelLoader": "IPAdapter Model Loader",
        "CLIPVisionLoader": "Load CLIP Vision",
    }
)


def catalog_fields(root: Path) -> dict[str, Any]:
    """The Catalog's IP-Adapter lists for a store (``Comfy.catalog``)."""
    return {
        "ipadapters": tuple(names.adapter_files(root)),
        "clip_vision": tuple(names.encoder_names(root)),
        "store": Path(root),
    }


def _store(c: Catalog) -> Path:
    return c.store if c.store is not None else Path(".")


PACK = "custom_nodes.ComfyUI_IPAdapter_plus"  # python_module of cubiq's nodes in ComfyUI's /object_info


def cubiq_node(cls: type[Node]) -> type[Node]:
    """One of cubiq's nodes: its pack as python_module, and ComfyUI's list check first (an unknown
    value is value_not_in_list), then the node's own check."""
    cls.CHECKED = False
    cls.MODULE = PACK
    return cls


def _served(served: dict[str, tuple[str, ...]]) -> Any:
    """A node's check: each refusable choice is one of ``served``."""

    def check(name: str, value: Any, catalog: Catalog) -> str | None:
        allowed = served.get(name)
        if allowed is None or value in allowed:
            return None
        return f"{value!r} is not served: {WHY[name]}; supported: {list(allowed)}"

    return check


# --- loaders ---


def _model_loader_inputs(c: Catalog) -> dict[str, In]:
    store = _store(c)

    def accepts(v: str) -> bool:
        return c.store is not None and names.adapter_name(v, names.adapter_files(store)) is not None

    return {"ipadapter_file": Enum(c.ipadapters, accepts=accepts)}


def _file_check(name: str, value: Any, c: Catalog) -> str | None:
    if name != "ipadapter_file" or c.store is None:
        return None
    listed = names.adapter_files(c.store)
    our = names.adapter_name(str(value), listed)
    rel = next((f for f, n in listed.items() if n == our), None)
    if rel is None:
        return None  # the list check said so
    problem = names.file_problem(c.store, rel)
    return None if problem is None else f"{value!r} {problem}"


@cubiq_node
@node("IPAdapterModelLoader", "ipadapter/loaders", ["IPADAPTER"], _model_loader_inputs, check=_file_check)
async def ipadapter_model_loader(rt: NodeRun, ipadapter_file: str) -> tuple[Any, ...]:
    """An adapter file of model_store/ipadapter/ (our name or ComfyUI's file name)."""
    listed = await asyncio.to_thread(names.adapter_files, rt.service.pool.store.root)
    our = names.adapter_name(ipadapter_file, listed)
    if our is None:
        raise InputError("ipadapter_file", f"unknown IP-Adapter {ipadapter_file!r}", list(listed))
    return (IPAdapterPipe(our),)


def _clip_inputs(c: Catalog) -> dict[str, In]:
    store = _store(c)

    def accepts(v: str) -> bool:
        return c.store is not None and names.encoder_folder(v, names.encoder_names(store)) is not None

    return {"clip_name": Enum(c.clip_vision, accepts=accepts)}


@node("CLIPVisionLoader", "loaders", ["CLIP_VISION"], _clip_inputs)
async def clip_vision_loader(rt: NodeRun, clip_name: str) -> tuple[Any, ...]:
    """A CLIP image encoder folder of model_store/ipadapter/ (ComfyUI's ViT-H / bigG file names map
    onto the folder of that encoder)."""
    listed = await asyncio.to_thread(names.encoder_names, rt.service.pool.store.root)
    folder = names.encoder_folder(clip_name, listed)
    if folder is None:
        raise InputError("clip_name", f"no CLIP vision encoder {clip_name!r}", list(listed))
    return (ClipVisionRef(clip_name, folder),)


def _unified_inputs(c: Catalog) -> dict[str, In]:
    return {"model": MODEL, "preset": Enum(tuple(names.PRESETS))} | {
        "ipadapter": In("IPADAPTER", optional=True)
    }


def _preset_check(name: str, value: Any, c: Catalog) -> str | None:
    if name != "preset" or value not in names.PRESETS:
        return None
    preset = names.PRESETS[value]
    if preset.refused:
        served = [p for p, v in names.PRESETS.items() if not v.refused]
        return f"{value!r}: {preset.refused}; served presets: {served}"
    listed = dict.fromkeys(c.ipadapters, "")
    if any(names.preset_file(value, sdxl, listed) for sdxl in (False, True)):
        return None
    return (
        f"{value!r}: no file for it in model_store/ipadapter/ (looked for {names.preset_wants(value)}); "
        f"files there: {list(c.ipadapters)}"
    )


@cubiq_node
@node(
    "IPAdapterUnifiedLoader",
    "ipadapter",
    [("MODEL", "model"), ("IPADAPTER", "ipadapter")],
    _unified_inputs,
    check=_preset_check,
)
async def unified_loader(rt: NodeRun, model: ModelRef, preset: str, ipadapter: Any = None) -> tuple[Any, ...]:
    """The preset's adapter for the model's family (SD 1.x or SDXL) and the encoder it runs with."""
    root = rt.service.pool.store.root
    listed = await asyncio.to_thread(names.adapter_files, root)
    async with _Loaded(rt, model) as loaded:
        images = loaded.images
        rel = names.preset_file(preset, loaded.sdxl, listed)
        if rel is None:
            family = "SDXL" if loaded.sdxl else "SD 1.x"
            raise InputError(
                "preset",
                f"{preset!r} has no {family} file in model_store/ipadapter/ for model {model.name!r} "
                f"(looked for {names.preset_wants(preset)}); files there: {list(listed)}",
                list(listed),
            )
        aid = await asyncio.to_thread(_resolve, images, listed[rel], "preset")
        encoder = images.adapters[aid].encoder.folder.path.relative_to(root / names.FOLDER).as_posix()
    return model, IPAdapterPipe(listed[rel], encoder)


# --- applying ---


class _Loaded:
    """The sampler's model, loaded and pinned while a node reads its IP-Adapters (``images``)."""

    def __init__(self, rt: NodeRun, model: ModelRef) -> None:
        self.rt, self.model = rt, model
        self._using: Any = None
        self.sdxl = False

    async def __aenter__(self) -> _Loaded:
        pool = self.rt.service.pool
        name = pool.resolve(self.model.name)
        if name is None:
            raise InputError("model", f"unknown model {self.model.name!r}", pool.known())
        self._using = pool.using(name)
        text = getattr(await self._using.__aenter__(), "text_model", None)
        images = getattr(text, "images", None)
        if not isinstance(images, ImageAdapters):
            await self._using.__aexit__(None, None, None)
            raise InputError("model", f"model {name!r} takes no IP-Adapters (Stable Diffusion 1.x / SDXL do)")
        self.images, self.sdxl = images, bool(getattr(text, "is_sdxl", False))
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._using.__aexit__(*exc)


def _resolve(images: ImageAdapters, adapter: str, field: str) -> int:
    """The adapter's id on this model; its errors (another base model, no fitting encoder) name ``field``."""
    try:
        return images.resolve(adapter, field)
    except InputError as exc:
        raise InputError(field, exc.message, exc.allowed) from exc


def _prepare(images: ImageAdapters, unit: IPAdapterUnit, encoder: str, root: Path) -> None:
    """Resolve the adapter, check the encoder is the one it runs with, encode the image (kept)."""
    aid = _resolve(images, unit.adapter, "ipadapter")
    used = images.adapters[aid].encoder.folder
    want = (root / names.FOLDER / encoder).resolve()
    if used.path.resolve() != want:
        rel = used.path.relative_to(root / names.FOLDER).as_posix()
        raise InputError(
            "clip_vision",
            f"IP-Adapter {unit.adapter!r} runs with the image encoder {rel!r} (the one whose width fits "
            f"it: hidden {used.hidden_size}, projection {used.projection_dim}); {encoder!r} is another",
            [rel],
        )
    ref = IPAdapterRef(unit.adapter, unit.image, unit.weight, unit.start, unit.end)
    try:
        images.prepare([ref])
    except InputError as exc:
        field = "image" if exc.field.endswith(".image") else exc.field
        raise InputError(field, exc.message, exc.allowed) from exc


async def _apply(
    rt: NodeRun,
    model: ModelRef,
    ipadapter: IPAdapterPipe,
    image: Tensor,
    weight: float,
    window: tuple[float, float],
    clip_vision: ClipVisionRef | None = None,
) -> tuple[Any, ...]:
    if len(model.ip_adapters) >= MAX_ADAPTERS:
        raise InputError(
            "model",
            f"at most {MAX_ADAPTERS} IPAdapter nodes on one model (this would be the {MAX_ADAPTERS + 1}th)",
        )
    if image.ndim != 4 or image.shape[0] != 1:
        raise InputError(
            "image",
            f"one reference image per IPAdapter node (this IMAGE is a batch of {image.shape[0]}): chain one "
            "IPAdapter node per image",
        )
    encoder = clip_vision.folder if clip_vision is not None else ipadapter.encoder
    if encoder is None:
        raise InputError(
            "clip_vision",
            "Missing CLIPVision model: connect a CLIPVisionLoader to clip_vision (IPAdapterModelLoader's "
            "IPADAPTER carries none), or load with IPAdapterUnifiedLoader",
        )
    pil = await asyncio.to_thread(image_to_pil, image[0])
    unit = IPAdapterUnit(ipadapter.adapter, GatedImage(pil, "ip_adapters.image"), weight, *window)
    root = rt.service.pool.store.root
    async with _Loaded(rt, model) as loaded:
        await asyncio.to_thread(_prepare, loaded.images, unit, encoder, root)
    return (model.with_(ip_adapters=(*model.ip_adapters, unit)),)


def _refuse_links(**links: Any) -> None:
    for name, value in links.items():
        if value is not None:
            what = "attention masks" if name == "attn_mask" else "negative reference images"
            raise InputError(name, f"{what} are not served: leave {name} unconnected", [])


def _simple_inputs(c: Catalog) -> dict[str, In]:
    head = {"model": MODEL, "ipadapter": IPADAPTER, "image": IMAGE, "weight": Float(1.0, -1.0, 3.0, 0.05)}
    return head | PERCENT | {"weight_type": Enum(SIMPLE_WEIGHT_TYPES), "attn_mask": In("MASK", optional=True)}


@cubiq_node
@node("IPAdapter", "ipadapter", ["MODEL"], _simple_inputs, check=_served({"weight_type": ("standard",)}))
async def ipadapter_simple(
    rt: NodeRun, model: ModelRef, ipadapter: IPAdapterPipe, image: Tensor, **kw: Any
) -> tuple[Any, ...]:
    """The reference image at ``weight`` between start_at and end_at (weight_type "standard")."""
    _refuse_links(attn_mask=kw.get("attn_mask"))
    return await _apply(rt, model, ipadapter, image, kw["weight"], (kw["start_at"], kw["end_at"]))


def _advanced_inputs(c: Catalog) -> dict[str, In]:
    head = {"model": MODEL, "ipadapter": IPADAPTER, "image": IMAGE, "weight": Float(1.0, -1.0, 5.0, 0.05)}
    head |= {"weight_type": Enum(WEIGHT_TYPES), "combine_embeds": Enum(COMBINE)}
    tail = {"embeds_scaling": Enum(SCALING)}
    optional = {k: In(t, optional=True) for k, t in (("image_negative", "IMAGE"), ("attn_mask", "MASK"))}
    return head | PERCENT | tail | optional | {"clip_vision": In("CLIP_VISION", optional=True)}


@cubiq_node
@node(
    "IPAdapterAdvanced",
    "ipadapter",
    ["MODEL"],
    _advanced_inputs,
    check=_served({"weight_type": ("linear",), "embeds_scaling": ("V only",)}),
)
async def ipadapter_advanced(
    rt: NodeRun, model: ModelRef, ipadapter: IPAdapterPipe, image: Tensor, **kw: Any
) -> tuple[Any, ...]:
    """IPAdapter with the encoder given (clip_vision) or the loader's; linear weight, V only."""
    _refuse_links(image_negative=kw.get("image_negative"), attn_mask=kw.get("attn_mask"))
    window = (kw["start_at"], kw["end_at"])
    return await _apply(rt, model, ipadapter, image, kw["weight"], window, kw.get("clip_vision"))

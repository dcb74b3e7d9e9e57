"""How a ComfyUI node is declared here: its inputs (with ComfyUI's types and bounds) and outputs,
from which ``/object_info`` is generated and against which a workflow is validated.

A node is a small class: ``inputs(catalog)`` returns its inputs in order (the enum lists come from
the :class:`Catalog`: our models, samplers, schedules, LoRAs, the caller's uploads), ``RETURNS`` its
outputs as (type, name), and ``run`` computes them (``async``: sampler nodes wait on the engine).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from .runtime import NodeRun

MAX_SEED = 0xFFFFFFFFFFFFFFFF  # ComfyUI's seed range: 0 .. 2**64 - 1
MAX_RESOLUTION = 16384  # ComfyUI's nodes.MAX_RESOLUTION (our own size limits apply when sampling)


@dataclass(frozen=True)
class Catalog:
    """The enum lists nodes offer, read once per /object_info or validation."""

    models: tuple[str, ...] = ()
    samplers: tuple[str, ...] = ()
    schedules: tuple[str, ...] = ()
    loras: tuple[str, ...] = ()
    controlnets: tuple[str, ...] = ()  # model_store/controlnet/ (GET /controlnet/model_list)
    ipadapters: tuple[str, ...] = ()  # model_store/ipadapter/ files, as ComfyUI lists models/ipadapter
    clip_vision: tuple[str, ...] = ()  # the CLIP image encoders there (nodes_ipadapter.py names them)
    store: Path | None = None  # the model store (checks that read its files)
    inputs: tuple[str, ...] = ()  # the caller's uploaded images (LoadImage)
    max_batch: int = 64  # the service's max images per request
    max_steps: int = 10000  # the service's max steps
    resolves_sampler: Callable[[str], bool] = field(default=lambda _n: False)
    resolves_schedule: Callable[[str], bool] = field(default=lambda _n: False)
    resolves_model: Callable[[str], bool] = field(default=lambda _n: False)


@dataclass(frozen=True)
class In:
    """One input: a link type (MODEL, LATENT, ...), a value type (INT, FLOAT, STRING, BOOLEAN) with
    its options, or an enum (``choices``). ``accepts`` widens an enum beyond its listed values
    (ComfyUI spellings we resolve, a checkpoint named with its file extension)."""

    type: str
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple[str, ...] | None = None
    optional: bool = False
    multiline: bool = False
    tooltip: str = ""
    extra: tuple[tuple[str, Any], ...] = ()
    accepts: Callable[[str], bool] | None = None
    max_length: int = 100_000  # STRING: not in ComfyUI's options (it has no bound); ours

    @property
    def is_value(self) -> bool:
        return self.choices is not None or self.type in VALUE_TYPES

    def config(self) -> list[Any]:
        """ComfyUI's ``[type, {options}]`` (an enum: ``[[values...], {options}]``)."""
        opts: dict[str, Any] = {}
        if self.default is not None:
            opts["default"] = self.default
        for key in ("min", "max", "step"):
            value = getattr(self, key)
            if value is not None:
                opts[key] = value
        if self.multiline:
            opts["multiline"] = True
        if self.tooltip:
            opts["tooltip"] = self.tooltip
        opts |= dict(self.extra)
        head: Any = list(self.choices) if self.choices is not None else self.type
        return [head, opts] if opts else [head]


VALUE_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN"})


def Int(default: int, lo: int, hi: int, step: int = 1, **kw: Any) -> In:
    return In("INT", default, lo, hi, step, **kw)


def Float(default: float, lo: float, hi: float, step: float = 0.01, **kw: Any) -> In:
    return In("FLOAT", default, lo, hi, step, **kw)


def Str(default: str = "", **kw: Any) -> In:
    return In("STRING", default, **kw)


def Enum(choices: Sequence[str], default: str | None = None, **kw: Any) -> In:
    values = tuple(choices)
    if default is None and values:
        default = values[0]
    return In("COMBO", default if default in values else None, choices=values, **kw)


def Seed(**kw: Any) -> In:
    return In("INT", 0, 0, MAX_SEED, 1, extra=(("control_after_generate", True),), **kw)


class Node:
    """A ComfyUI node type. Subclasses set the class attributes and implement ``inputs`` / ``run``."""

    NAME: ClassVar[str]
    DISPLAY: ClassVar[str] = ""
    CATEGORY: ClassVar[str] = ""
    DESCRIPTION: ClassVar[str] = ""
    RETURNS: ClassVar[tuple[tuple[str, str], ...]] = ()  # (type, name)
    OUTPUT_NODE: ClassVar[bool] = False
    # run() results cached per (node, inputs); SaveImage too (ComfyUI reuses its ui output)
    CACHEABLE: ClassVar[bool] = True
    CHECKED: ClassVar[bool] = False  # has its own check (ComfyUI's VALIDATE_INPUTS): no list check
    MODULE: ClassVar[str] = "nodes"  # /object_info's python_module (a custom node pack's own name)

    @classmethod
    def inputs(cls, catalog: Catalog) -> dict[str, In]:
        return {}

    def run(self, rt: NodeRun, **kw: Any) -> Awaitable[tuple[Any, ...] | dict[str, Any]]:
        """The outputs, in ``RETURNS`` order; an output node may return ``{"ui": ..., "result": ...}``."""
        raise NotImplementedError

    @classmethod
    def check(cls, name: str, value: Any, catalog: Catalog) -> str | None:
        """Extra validation of one value input (ComfyUI's VALIDATE_INPUTS): a reason, or None."""
        return None

    @classmethod
    def describe(cls, catalog: Catalog) -> dict[str, Any]:
        """This node's ``/object_info`` entry, in ComfyUI's shape."""
        ins = cls.inputs(catalog)
        required = {k: v.config() for k, v in ins.items() if not v.optional}
        optional = {k: v.config() for k, v in ins.items() if v.optional}
        spec: dict[str, Any] = {"required": required}
        if optional:
            spec["optional"] = optional
        order: dict[str, list[str]] = {"required": list(required)}
        if optional:
            order["optional"] = list(optional)
        return {
            "input": spec,
            "input_order": order,
            "output": [t for t, _ in cls.RETURNS],
            "output_is_list": [False for _ in cls.RETURNS],
            "output_name": [n for _, n in cls.RETURNS],
            "name": cls.NAME,
            "display_name": cls.DISPLAY or cls.NAME,
            "description": cls.DESCRIPTION,
            "python_module": cls.MODULE,
            "category": cls.CATEGORY,
            "output_node": cls.OUTPUT_NODE,
        }


REGISTRY: dict[str, type[Node]] = {}  # every node class, by ComfyUI name (the node modules fill it)
Run = Callable[..., Awaitable[Any]]


# ComfyUI's NODE_DISPLAY_NAME_MAPPINGS for the nodes that have one
DISPLAY_NAMES = {
    "CheckpointLoaderSimple": "Load Checkpoint",
    "UNETLoader": "Load Diffusion Model",
    "UnetLoaderGGUF": "Unet Loader (GGUF)",
    "UnetLoaderGGUFAdvanced": "Unet Loader (GGUF/Advanced)",
    "DualCLIPLoaderGGUF": "DualCLIPLoader (GGUF)",
    "VAELoader": "Load VAE",
    "LoraLoader": "Load LoRA",
    "CLIPSetLastLayer": "CLIP Set Last Layer",
    "CLIPTextEncode": "CLIP Text Encode (Prompt)",
    "ConditioningCombine": "Conditioning (Combine)",
    "KSamplerAdvanced": "KSampler (Advanced)",
    "EmptyLatentImage": "Empty Latent Image",
    "EmptySD3LatentImage": "EmptySD3LatentImage",
    "LatentUpscale": "Upscale Latent",
    "LatentUpscaleBy": "Upscale Latent By",
    "SetLatentNoiseMask": "Set Latent Noise Mask",
    "LatentFromBatch": "Latent From Batch",
    "VAEEncode": "VAE Encode",
    "VAEDecode": "VAE Decode",
    "SaveImage": "Save Image",
    "PreviewImage": "Preview Image",
    "LoadImage": "Load Image",
    "ImageScale": "Upscale Image",
    "ETN_LoadImageBase64": "Load Image (Base64)",
    "ControlNetLoader": "Load ControlNet Model",
    "ControlNetApply": "Apply ControlNet (OLD)",
    "ControlNetApplyAdvanced": "Apply ControlNet",
}


def node(
    name: str,
    category: str,
    returns: Sequence[str | tuple[str, str]] = (),
    inputs: dict[str, In] | Callable[[Catalog], dict[str, In]] | None = None,
    *,
    description: str = "",
    output: bool = False,
    check: Callable[[str, Any, Catalog], str | None] | None = None,
    cacheable: bool = True,
) -> Callable[[Run], type[Node]]:
    """Declare a node from its ``run(rt, **inputs)`` function: the class is made and registered."""

    fixed = inputs if isinstance(inputs, dict) else {}
    ins = inputs if callable(inputs) else (lambda _c: dict(fixed))

    def make(fn: Run) -> type[Node]:
        attrs: dict[str, Any] = {
            "NAME": name,
            "DISPLAY": DISPLAY_NAMES.get(name, name),
            "CATEGORY": category,
            "DESCRIPTION": description or (fn.__doc__ or "").strip(),
            "RETURNS": tuple((r, r) if isinstance(r, str) else r for r in returns),
            "OUTPUT_NODE": output,
            "CACHEABLE": cacheable,
            "inputs": classmethod(lambda _cls, catalog: ins(catalog)),
            "run": lambda _self, rt, **kw: fn(rt, **kw),
        }
        if check is not None:
            attrs["check"] = classmethod(lambda _cls, n, v, c: check(n, v, c))
            attrs["CHECKED"] = True
        cls = type(name, (Node,), attrs)
        REGISTRY[name] = cls
        return cls

    return make

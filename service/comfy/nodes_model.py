"""Loader and model-patch nodes: which store model, LoRAs, clip skip, shift, guidance, prompts.

A checkpoint name is one of our model names (``digits``, ``sd1``...); ComfyUI's file spelling
(``digits.safetensors``) is accepted too. UNETLoader, DualCLIPLoader and VAELoader list the same
models (a Flux workflow loads the one folder three times); with an empty store their lists are empty.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from service.sampling.flow import flux_shift

from .node import Catalog, Enum, Float, In, Int, Str, node
from .runtime import NodeRun
from .values import ClipRef, Conditioning, ModelRef, VaeRef

EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".sft", ".gguf")
MODEL, CLIP, COND = In("MODEL"), In("CLIP"), In("CONDITIONING")


def model_name(value: str) -> str:
    """Our model name for a checkpoint value (a trailing file extension dropped)."""
    for ext in EXTENSIONS:
        if value.lower().endswith(ext):
            return value[: -len(ext)]
    return value


def _ckpt(catalog: Catalog) -> In:
    return Enum(catalog.models, accepts=catalog.resolves_model)


@node("CheckpointLoaderSimple", "loaders", ["MODEL", "CLIP", "VAE"], lambda c: {"ckpt_name": _ckpt(c)})
async def checkpoint_loader(rt: NodeRun, ckpt_name: str) -> tuple[Any, ...]:
    """Loads a model of the store: its denoiser, text encoder and VAE."""
    name = model_name(ckpt_name)
    return ModelRef(name), ClipRef(name), VaeRef(name)


_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")


@node(
    "UNETLoader",
    "advanced/loaders",
    ["MODEL"],
    lambda c: {"unet_name": _ckpt(c), "weight_dtype": Enum(_DTYPES)},
)
async def unet_loader(rt: NodeRun, unet_name: str, weight_dtype: str) -> tuple[Any, ...]:
    """A store model's denoiser (weight_dtype: the service's KDIFF_DTYPE applies)."""
    return (ModelRef(model_name(unet_name)),)


def _dual_clip_inputs(c: Catalog) -> dict[str, In]:
    return {
        "clip_name1": _ckpt(c),
        "clip_name2": _ckpt(c),
        "type": Enum(("sdxl", "sd3", "flux", "hunyuan_video")),
    }


async def dual_clip_loader(rt: NodeRun, clip_name1: str, **_: Any) -> tuple[Any, ...]:
    """A store model's text encoders (they live in its folder: the first name picks it)."""
    return (ClipRef(model_name(clip_name1)),)


node("DualCLIPLoader", "advanced/loaders", ["CLIP"], _dual_clip_inputs)(dual_clip_loader)


# city96's ComfyUI-GGUF nodes, as GGUF Flux / SD3 workflows name them: the same store models (a
# model whose manifest's weights are a .gguf is the quantized one); dequant / patch dtypes are ignored.
_GGUF_DTYPES = ("default", "target", "float32", "float16", "bfloat16")


async def _gguf_unet(rt: NodeRun, unet_name: str, **_: Any) -> tuple[Any, ...]:
    """ComfyUI-GGUF's Unet Loader: a store model's denoiser (``flux1-dev-Q8_0.gguf`` names the model
    ``flux1-dev-Q8_0``)."""
    return (ModelRef(model_name(unet_name)),)


node("UnetLoaderGGUF", "bootleg", ["MODEL"], lambda c: {"unet_name": _ckpt(c)})(_gguf_unet)
node(
    "UnetLoaderGGUFAdvanced",
    "bootleg",
    ["MODEL"],
    lambda c: {
        "unet_name": _ckpt(c),
        "dequant_dtype": Enum(_GGUF_DTYPES),
        "patch_dtype": Enum(_GGUF_DTYPES),
        "patch_on_device": In("BOOLEAN", False),
    },
)(_gguf_unet)
node("DualCLIPLoaderGGUF", "bootleg", ["CLIP"], _dual_clip_inputs)(dual_clip_loader)


@node("VAELoader", "loaders", ["VAE"], lambda c: {"vae_name": _ckpt(c)})
async def vae_loader(rt: NodeRun, vae_name: str) -> tuple[Any, ...]:
    """A store model's VAE (the engine decodes with the sampled model's own)."""
    return (VaeRef(model_name(vae_name)),)


@node(
    "LoraLoader",
    "loaders",
    ["MODEL", "CLIP"],
    lambda c: {
        "model": MODEL,
        "clip": CLIP,
        "lora_name": Enum(c.loras, accepts=lambda v: model_name(v) in c.loras),
        "strength_model": Float(1.0, -100.0, 100.0),
        "strength_clip": Float(1.0, -100.0, 100.0),
    },
)
async def lora_loader(
    rt: NodeRun, model: ModelRef, clip: ClipRef, lora_name: str, **kw: Any
) -> tuple[Any, ...]:
    """Our LoRAs weight the UNet and the text encoder alike per request: strength_model is the
    weight (strength_clip where strength_model is 0)."""
    name = model_name(lora_name)
    weight = float(kw["strength_model"] or kw["strength_clip"])
    lora = (name, weight)
    return model.with_(loras=(*model.loras, lora)), ClipRef(clip.name, clip.clip_skip, (*clip.loras, lora))


@node("CLIPSetLastLayer", "conditioning", ["CLIP"], {"clip": CLIP, "stop_at_clip_layer": Int(-1, -12, -1)})
async def clip_set_last_layer(rt: NodeRun, clip: ClipRef, stop_at_clip_layer: int) -> tuple[Any, ...]:
    """-2 is A1111's clip skip 2 (our clip_skip)."""
    return (ClipRef(clip.name, -stop_at_clip_layer, clip.loras),)


_TEXT = Str("", multiline=True, extra=(("dynamicPrompts", True),))


@node("CLIPTextEncode", "conditioning", ["CONDITIONING"], {"text": _TEXT, "clip": CLIP})
async def clip_text_encode(rt: NodeRun, text: str, clip: ClipRef) -> tuple[Any, ...]:
    """The prompt, encoded by the sampler's model family when it samples."""
    return (Conditioning(clip, (text,)),)


@node(
    "ConditioningCombine", "conditioning", ["CONDITIONING"], {"conditioning_1": COND, "conditioning_2": COND}
)
async def conditioning_combine(
    rt: NodeRun, conditioning_1: Conditioning, conditioning_2: Conditioning
) -> tuple[Any, ...]:
    """Joins the two prompts (ComfyUI averages two predictions; we encode one joined prompt)."""
    a, b = conditioning_1, conditioning_2
    guidance = a.guidance if a.guidance is not None else b.guidance
    return (Conditioning(a.clip, (*a.texts, *b.texts), guidance, (*a.controls, *b.controls)),)


@node(
    "FluxGuidance",
    "advanced/conditioning/flux",
    ["CONDITIONING"],
    {"conditioning": COND, "guidance": Float(3.5, 0.0, 100.0, 0.1)},
)
async def flux_guidance(rt: NodeRun, conditioning: Conditioning, guidance: float) -> tuple[Any, ...]:
    """Flux-dev's distilled guidance (our request's ``guidance``)."""
    return (replace(conditioning, guidance=guidance),)


@node("ModelSamplingSD3", "advanced/model", ["MODEL"], {"model": MODEL, "shift": Float(3.0, 0.0, 100.0)})
async def model_sampling_sd3(rt: NodeRun, model: ModelRef, shift: float) -> tuple[Any, ...]:
    """The timestep shift of a flow model's 'flow' schedule (our request's ``shift``)."""
    return (model.with_(shift=shift),)


def _flux_inputs(catalog: Catalog) -> dict[str, In]:
    size = Int(1024, 16, 16384, 8)
    return {"model": MODEL, "max_shift": Float(1.15, 0.0, 100.0), "base_shift": Float(0.5, 0.0, 100.0)} | {
        "width": size,
        "height": size,
    }


@node("ModelSamplingFlux", "advanced/model", ["MODEL"], _flux_inputs)
async def model_sampling_flux(rt: NodeRun, model: ModelRef, **kw: Any) -> tuple[Any, ...]:
    """Flux's resolution-dependent shift exp(mu) for width x height, as the shift of 'flow'."""
    tokens = (kw["width"] // 16) * (kw["height"] // 16)  # Flux's 2x2-packed latent
    return (model.with_(shift=flux_shift(tokens, base_shift=kw["base_shift"], max_shift=kw["max_shift"])),)

"""Latent and image nodes: EmptyLatentImage, LatentUpscale(By), LatentFromBatch, SetLatentNoiseMask,
VAEEncode, VAEDecode, SaveImage, PreviewImage, LoadImage, ImageScale, ETN_LoadImageBase64.

Every image that comes in (LoadImage's upload, ETN_LoadImageBase64's base64) goes through
``service.image_gate`` (bounded base64, format and size from the header before a pixel is decoded),
at validation already for base64 so a bomb is a node error of ``POST /prompt``.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from service import image_gate
from service.sampling.errors import InputError

from .node import MAX_RESOLUTION, Catalog, Enum, Float, In, Int, Str, node
from .runtime import NodeRun, image_to_pil, pil_to_image, save_png
from .sample import decode_latents, latent_images
from .values import Latent

MAX_OUTPUT_PIXELS = image_gate.DEFAULT_MAX_PIXELS  # a resized batch at most (one 4096 x 4096)
LATENT_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")
IMAGE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
CROPS = ("disabled", "center")


def _target(w: int, h: int, old_w: int, old_h: int, batch: int) -> tuple[int, int]:
    """ComfyUI's sizes: 0 keeps the aspect ratio from the other side (both 0: unchanged); a
    resized batch holds at most MAX_OUTPUT_PIXELS (192 MB as float RGB)."""
    if w == 0 and h == 0:
        return old_w, old_h
    if w == 0:
        w = max(1, round(old_w * h / old_h))
    if h == 0:
        h = max(1, round(old_h * w / old_w))
    if w * h * batch > MAX_OUTPUT_PIXELS:
        raise InputError("width", f"{batch} x {w}x{h} is over {MAX_OUTPUT_PIXELS} pixels in all")
    return w, h


def _crop_center(nchw: Tensor, w: int, h: int) -> Tensor:
    """Cut [B, C, H, W] to the aspect ratio of w x h, centred (ComfyUI's crop "center")."""
    old_h, old_w = nchw.shape[-2:]
    old_aspect, new_aspect = old_w / old_h, w / h
    if old_aspect > new_aspect:
        keep = round(old_h * new_aspect)
        x = (old_w - keep) // 2
        return nchw[..., x : x + keep]
    if old_aspect < new_aspect:
        keep = round(old_w / new_aspect)
        y = (old_h - keep) // 2
        return nchw[..., y : y + keep, :]
    return nchw


def _interpolate(nchw: Tensor, w: int, h: int, method: str, crop: str) -> Tensor:
    if crop == "center":
        nchw = _crop_center(nchw, w, h)
    mode = {"bislerp": "bilinear"}.get(method, method)
    corners = False if mode in ("bilinear", "bicubic") else None
    return F.interpolate(nchw, size=(h, w), mode=mode, align_corners=corners)


def resize(images: Tensor, w: int, h: int, method: str, crop: str) -> Tensor:
    """IMAGE [B, H, W, 3] -> [B, h, w, 3]; ``crop`` "center" cuts the source to the new aspect first."""
    if method == "lanczos":
        nchw = images.permute(0, 3, 1, 2)
        cut = (_crop_center(nchw, w, h) if crop == "center" else nchw).permute(0, 2, 3, 1)
        pils = [image_to_pil(i).resize((w, h), Image.Resampling.LANCZOS) for i in cut]
        return torch.cat([pil_to_image(p) for p in pils])
    out = _interpolate(images.permute(0, 3, 1, 2), w, h, method, crop)
    return out.clamp(0, 1).permute(0, 2, 3, 1).contiguous()


def _resize_latent(latent: Latent, w: int, h: int, method: str, crop: str) -> Latent:
    """A latent at w x h pixels: a model's latents interpolated in latent space (ComfyUI's
    common_upscale; lanczos as bicubic), else VAEEncode's pixels resized."""
    if latent.samples is not None:
        f = max(1, latent.width // latent.samples.shape[-1])  # pixels per latent cell
        lw, lh = max(1, w // f), max(1, h // f)
        method = "bicubic" if method == "lanczos" else method
        samples = _interpolate(latent.samples, lw, lh, method, crop)
        return latent.with_(width=lw * f, height=lh * f, samples=samples, images=None)
    if latent.images is None:
        return latent.with_(width=w, height=h)
    return latent.with_(width=w, height=h, images=resize(latent.images, w, h, method, crop))


LATENT, IMAGE = In("LATENT"), In("IMAGE")
SIZE = Int(512, 16, MAX_RESOLUTION, 8)
TARGET = Int(512, 0, MAX_RESOLUTION, 8)


def _empty_latent(c: Catalog) -> dict[str, In]:
    return {"width": SIZE, "height": SIZE, "batch_size": Int(1, 1, c.max_batch)}


@node("EmptyLatentImage", "latent", ["LATENT"], _empty_latent)
async def empty_latent(rt: NodeRun, width: int, height: int, batch_size: int) -> tuple[Any, ...]:
    """Noise of this size for a sampler (a fixed-size model samples at its own size)."""
    return (Latent(width, height, batch_size),)


@node("EmptySD3LatentImage", "latent/sd3", ["LATENT"], _empty_latent)
async def empty_sd3_latent(rt: NodeRun, width: int, height: int, batch_size: int) -> tuple[Any, ...]:
    """SD3's and Flux's empty latent (ComfyUI's own has 16 channels; ours are the model's)."""
    return (Latent(width, height, batch_size),)


def _latent_upscale(c: Catalog) -> dict[str, In]:
    size = {"width": TARGET, "height": TARGET}
    return {"samples": LATENT, "upscale_method": Enum(LATENT_METHODS)} | size | {"crop": Enum(CROPS)}


@node("LatentUpscale", "latent", ["LATENT"], _latent_upscale)
async def latent_upscale(rt: NodeRun, samples: Latent, upscale_method: str, **kw: Any) -> tuple[Any, ...]:
    """A sampler's latents resized in latent space (VAEEncode's pixels: the pixels)."""
    w, h = _target(kw["width"], kw["height"], samples.width, samples.height, samples.batch)
    return (await asyncio.to_thread(_resize_latent, samples, w, h, upscale_method, kw["crop"]),)


_BY = {"samples": LATENT, "upscale_method": Enum(LATENT_METHODS), "scale_by": Float(1.5, 0.01, 8.0, 0.01)}


@node("LatentUpscaleBy", "latent", ["LATENT"], _BY)
async def latent_upscale_by(
    rt: NodeRun, samples: Latent, upscale_method: str, scale_by: float
) -> tuple[Any, ...]:
    f = samples.width // samples.samples.shape[-1] if samples.samples is not None else 1
    # ComfyUI rounds the latent's own sides (pixels / 8 on SD models)
    w, h = (max(1, round(side // f * scale_by)) * f for side in (samples.width, samples.height))
    w, h = _target(w, h, samples.width, samples.height, samples.batch)
    return (await asyncio.to_thread(_resize_latent, samples, w, h, upscale_method, "disabled"),)


def _from_batch(latent: Latent, start: int, length: int) -> Latent:
    """ComfyUI's LatentFromBatch: images start .. start + length of the batch (clamped), their noise
    mask, and their batch_index (so each keeps its seed: seed + its index in the first batch)."""
    start = min(latent.batch - 1, start)
    length = min(latent.batch - start, length)
    part = slice(start, start + length)
    index = latent.batch_index or tuple(range(latent.batch))
    mask = latent.noise_mask
    if mask is not None and mask.shape[0] > 1:
        reps = -(-latent.batch // mask.shape[0])
        mask = mask.repeat(reps, 1, 1)[: latent.batch][part]
    return latent.with_(
        batch=length,
        images=None if latent.images is None else latent.images[part],
        samples=None if latent.samples is None else latent.samples[part],
        noise_mask=mask,
        batch_index=tuple(index[part]),
    )


_FROM_BATCH = {"samples": LATENT, "batch_index": Int(0, 0, 63), "length": Int(1, 1, 64)}


@node("LatentFromBatch", "latent/batch", ["LATENT"], _FROM_BATCH)
async def latent_from_batch(rt: NodeRun, samples: Latent, batch_index: int, length: int) -> tuple[Any, ...]:
    """Part of a batch; sampled again, each image has the noise it had in the whole batch."""
    return (_from_batch(samples, batch_index, length),)


@node("SetLatentNoiseMask", "latent/inpaint", ["LATENT"], {"samples": LATENT, "mask": In("MASK")})
async def set_latent_noise_mask(rt: NodeRun, samples: Latent, mask: Tensor) -> tuple[Any, ...]:
    """The sampler repaints where the mask is 1 (our inpainting mask)."""
    return (samples.with_(noise_mask=mask.reshape(-1, mask.shape[-2], mask.shape[-1])),)


@node("VAEEncode", "latent", ["LATENT"], {"pixels": IMAGE, "vae": In("VAE")})
async def vae_encode(rt: NodeRun, pixels: Tensor, vae: Any) -> tuple[Any, ...]:
    """The image becomes the sampler's img2img start (our engine encodes it with its VAE)."""
    b, h, w, _ = pixels.shape
    return (Latent(w, h, b, images=pixels),)


@node("VAEDecode", "latent", ["IMAGE"], {"samples": LATENT, "vae": In("VAE")})
async def vae_decode(rt: NodeRun, samples: Latent, vae: Any) -> tuple[Any, ...]:
    """A sampler's result was decoded by the engine with the sampled model's VAE; resized latents
    are decoded here by that model's."""
    if samples.images is None and samples.samples is not None and samples.model is not None:
        return (await decode_latents(rt, samples.model, samples.samples),)
    return (latent_images(samples),)


async def _save(rt: NodeRun, images: Tensor, prefix: str, kind: str) -> dict[str, Any]:
    pngs = await asyncio.to_thread(lambda: [save_png(i, rt.prompt) for i in images])
    saved = [rt.ctx.save_image(png, batch_prefix(prefix, i), kind) for i, png in enumerate(pngs)]
    return {"ui": {"images": saved}, "result": ()}


def batch_prefix(prefix: str, index: int) -> str:
    """ComfyUI's SaveImage puts each image's index in the batch for ``%batch_num%`` in the file name
    (not in a subfolder); the other variables are the storage's to expand (``save_image``)."""
    cut = max(prefix.rfind("/"), prefix.rfind("\\")) + 1
    return prefix[:cut] + prefix[cut:].replace("%batch_num%", str(index))


@node("SaveImage", "image", (), {"images": IMAGE, "filename_prefix": Str("ComfyUI")}, output=True)
async def save_image(rt: NodeRun, images: Tensor, filename_prefix: str) -> dict[str, Any]:
    """Saves the images to the caller's output folder (GET /view), the workflow in each PNG."""
    return await _save(rt, images, filename_prefix, "output")


@node("PreviewImage", "image", (), {"images": IMAGE}, output=True)
async def preview_image(rt: NodeRun, images: Tensor) -> dict[str, Any]:
    """Saves the images as temporary files."""
    return await _save(rt, images, "ComfyUI_temp_" + secrets.token_hex(3), "temp")


def gated_image(data: str | bytes, field: str, upright: bool = False) -> tuple[Tensor, Tensor]:
    """IMAGE [1, H, W, 3] and MASK [1, H, W] (1 - alpha; zeros without alpha) of an incoming image;
    ``upright``: turned as its EXIF orientation says (ComfyUI's LoadImage does, so a phone photo
    stored sideways loads the way every viewer shows it)."""
    try:
        img = image_gate.load(data, field).image
    except image_gate.ImageInputError as exc:
        raise InputError(exc.field, exc.message, exc.allowed) from exc
    if upright:
        img = image_gate.upright(img)
    image = pil_to_image(img)
    if "A" in img.getbands():
        alpha = pil_to_image(img.getchannel("A"))[..., 0]
        mask = 1.0 - alpha
    else:
        mask = torch.zeros(1, image.shape[1], image.shape[2])
    return image, mask


def split_annotated(name: str) -> tuple[str, str, str]:
    """ComfyUI's image names: "sub/x.png", "x.png [output]" -> (file, subfolder, type)."""
    kind = "input"
    for k in ("output", "input", "temp"):
        if name.endswith(f" [{k}]"):
            name, kind = name[: -len(k) - 3], k
    sub, _, file = name.rpartition("/")
    return file, sub, kind


def _listed(name: str, value: Any, catalog: Catalog) -> str | None:
    return None if value in catalog.inputs else f"Invalid image file: {value}"


# the file under a name may change (an upload with overwrite): LoadImage always runs
def _load_inputs(c: Catalog) -> dict[str, In]:
    return {"image": Enum(sorted(c.inputs), extra=(("image_upload", True),))}


@node("LoadImage", "image", ["IMAGE", "MASK"], _load_inputs, check=_listed, cacheable=False)
async def load_image(rt: NodeRun, image: str) -> tuple[Any, ...]:
    """An uploaded image (POST /upload/image) and its alpha as the mask (1 - alpha)."""
    file, sub, kind = split_annotated(image)
    try:
        data = rt.ctx.load_image(file, sub, kind)
    except (FileNotFoundError, ValueError) as exc:
        raise InputError("image", f"Invalid image file: {image} ({exc})") from exc
    return await asyncio.to_thread(gated_image, data, "image", True)


def _scale_inputs(c: Catalog) -> dict[str, In]:
    size = Int(512, 0, MAX_RESOLUTION, 1)
    return {
        "image": IMAGE,
        "upscale_method": Enum(IMAGE_METHODS),
        "width": size,
        "height": size,
        "crop": Enum(CROPS),
    }


@node("ImageScale", "image/upscaling", ["IMAGE"], _scale_inputs)
async def image_scale(rt: NodeRun, image: Tensor, upscale_method: str, **kw: Any) -> tuple[Any, ...]:
    w, h = _target(kw["width"], kw["height"], image.shape[2], image.shape[1], image.shape[0])
    return (await asyncio.to_thread(resize, image, w, h, upscale_method, kw["crop"]),)


def _header(name: str, value: Any, catalog: Catalog) -> str | None:
    try:  # the header only: pixels are decoded when the node runs, off the event loop
        image_gate.open_header(str(value), "image").close()
    except image_gate.ImageInputError as exc:
        return exc.message
    return None


_B64 = {"image": Str("", max_length=image_gate.MAX_B64_CHARS)}


@node("ETN_LoadImageBase64", "external_tooling", ["IMAGE", "MASK"], _B64, check=_header)
async def load_image_base64(rt: NodeRun, image: str) -> tuple[Any, ...]:
    """Acly's comfyui-tooling-nodes node (SillyTavern's avatar workflow uses it): a base64 image in."""
    return await asyncio.to_thread(gated_image, image, "image")

"""A1111's extras (postprocessing) routes: ``POST /sdapi/v1/extra-single-image`` and
``/extra-batch-images``, with A1111's request fields (modules/api/models.py ExtrasBaseRequest) and its
upscale semantics (scripts/postprocessing_upscale.py):

- ``resize_mode`` 0: scale by ``upscaling_resize``; 1: to ``upscaling_resize_w`` x ``_h``, the factor
  ``max(w / W, h / H)``, then (``upscaling_crop``) centred on a canvas of exactly that size;
- the upscaler's own rule (modules/upscaler.py): target ``int(W * factor // 8 * 8)``, model passes until
  covered, Lanczos to the target;
- ``upscaler_1`` "None": the image comes back as it is; ``upscaler_2`` with
  ``extras_upscaler_2_visibility`` > 0: the same upscale with it, blended in (PIL ``Image.blend``);
- ``html_info``: the "Postprocess ..." infotext as A1111's plaintext_to_html writes it.

Every image is read by the image gate; upscaling runs in a worker thread (the model's batcher thread
runs the tiles); one image of a batch is decoded, upscaled and encoded at a time.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any, Literal

from fastapi import APIRouter, Depends
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from service import image_gate
from service.image_gate import ImageInputError
from service.models.upscalers import Upscalers
from service.models.upscalers.resize import from_pil, to_pil
from service.sampling.errors import InputError

from ..deps import require_api_key
from .a1111_encode import Encoding, encode, encoding
from .a1111_schemas import ImageB64
from .caller import CompatCall, compat_caller
from .errors import A1111Route

router = APIRouter(
    prefix="/sdapi/v1", tags=["a1111"], dependencies=[Depends(require_api_key)], route_class=A1111Route
)
MAX_BATCH_IMAGES = 64


class ExtrasRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    resize_mode: Literal[0, 1] = Field(0, description="0: by upscaling_resize; 1: to upscaling_resize_w x _h")
    show_extras_results: bool = Field(
        True, description="accepted; A1111 returns the images either way on the API"
    )
    gfpgan_visibility: float = Field(0, ge=0, le=1, description="face restoration: none here (0 only)")
    codeformer_visibility: float = Field(0, ge=0, le=1, description="face restoration: none here (0 only)")
    codeformer_weight: float = Field(0, ge=0, le=1)
    upscaling_resize: float = Field(2, ge=1, le=8)
    upscaling_resize_w: int = Field(512, ge=1, le=16384)
    upscaling_resize_h: int = Field(512, ge=1, le=16384)
    upscaling_crop: bool = True
    upscaler_1: str = Field("None", max_length=256)
    upscaler_2: str = Field("None", max_length=256)
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1)
    upscale_first: bool = False


class ExtrasSingleImageRequest(ExtrasRequest):
    image: ImageB64 = Field("", description="base64 (or a data URL) PNG, JPEG or WebP")


class FileData(BaseModel):
    data: ImageB64
    name: str = Field("", max_length=1024)


class ExtrasBatchImagesRequest(ExtrasRequest):
    imageList: list[FileData] = Field(max_length=MAX_BATCH_IMAGES)  # noqa: N815 (A1111's name)


class ExtrasSingleImageResponse(BaseModel):
    html_info: str
    image: str


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str
    images: list[str]


def _check(body: ExtrasRequest, ups: Upscalers) -> None:
    for field in ("gfpgan_visibility", "codeformer_visibility"):
        if getattr(body, field) > 0:
            raise InputError(field, "this service has no face restoration models; send 0", [0])
    names = ups.names()
    for field in ("upscaler_1", "upscaler_2"):
        name = getattr(body, field)
        if name not in names:
            raise InputError(field, f"unknown upscaler {name!r}; available: {', '.join(names)}", names)


def _upscale_one(
    img: Image.Image, body: ExtrasRequest, ups: Upscalers, name: str, field: str
) -> tuple[Image.Image, dict[str, Any]]:
    """ScriptPostprocessingUpscale.upscale: one upscaler's result and its infotext items."""
    info: dict[str, Any] = {}
    if body.resize_mode == 1:
        w, h = body.upscaling_resize_w, body.upscaling_resize_h
        factor = max(w / img.width, h / img.height)
        info["Postprocess upscale to"] = f"{w}x{h}"
    else:
        factor = body.upscaling_resize
        info["Postprocess upscale by"] = body.upscaling_resize
    out = to_pil(ups.upscale(from_pil(img), name, scale=factor, field=field))
    if body.resize_mode == 1 and body.upscaling_crop:
        canvas = Image.new("RGB", (w, h))
        canvas.paste(out, box=(w // 2 - out.width // 2, h // 2 - out.height // 2))
        out = canvas
        info["Postprocess crop to"] = f"{out.width}x{out.height}"
    return out, info


def postprocess(img: Image.Image, body: ExtrasRequest, ups: Upscalers) -> tuple[Image.Image, str]:
    """One image through A1111's upscale step: (the result, its infotext)."""
    img = img.convert("RGB")
    if body.upscaler_1 == "None":
        return img, ""
    out, info = _upscale_one(img, body, ups, body.upscaler_1, "upscaler_1")
    info["Postprocess upscaler"] = body.upscaler_1
    if body.upscaler_2 != "None" and body.extras_upscaler_2_visibility > 0:
        second, _ = _upscale_one(img, body, ups, body.upscaler_2, "upscaler_2")
        out = Image.blend(out, second, body.extras_upscaler_2_visibility)
        info["Postprocess upscaler 2"] = body.upscaler_2
    return out, ", ".join(f"{k}: {v}" for k, v in info.items())


def _html(text: str) -> str:
    """A1111's ui_common.plaintext_to_html."""
    return "<p>" + "<br>\n".join(html.escape(x) for x in text.split("\n")) + "</p>"


def _run(data: str, field: str, body: ExtrasRequest, ups: Upscalers, enc: Encoding) -> tuple[str, str]:
    try:
        img = image_gate.load(data, field).image
    except ImageInputError as exc:
        raise InputError(exc.field, exc.message, exc.allowed) from exc
    out, text = postprocess(img, body, ups)
    if enc.format == "png":
        buf = io.BytesIO()
        out.save(buf, format="PNG", compress_level=1)
        encoded = buf.getvalue()
    else:  # the caller's samples_format, as A1111 encodes extras (no generation infotext here)
        encoded = encode(out, {}, "", enc)
    return base64.b64encode(encoded).decode(), text


async def _extras(
    body: ExtrasRequest, call: CompatCall, images: list[tuple[str, str]]
) -> tuple[list[str], str]:
    """Each (base64, field) image in turn, off the loop: the images and the last one's infotext (HTML)."""
    ups = call.state.pool.upscalers
    _check(body, ups)
    enc = encoding(call.options())
    out, text = [], ""
    for data, field in images:
        image, text = await ups.call(_run, data, field, body, ups, enc)
        out.append(image)
    return out, _html(text)


@router.post("/extra-single-image", response_model=ExtrasSingleImageResponse)
async def extra_single_image(
    body: ExtrasSingleImageRequest, call: CompatCall = Depends(compat_caller)
) -> dict[str, Any]:
    images, info = await _extras(body, call, [(body.image, "image")])
    return {"html_info": info, "image": images[0]}


@router.post("/extra-batch-images", response_model=ExtrasBatchImagesResponse)
async def extra_batch_images(
    body: ExtrasBatchImagesRequest, call: CompatCall = Depends(compat_caller)
) -> dict[str, Any]:
    items = [(item.data, f"imageList.{i}.data") for i, item in enumerate(body.imageList)]
    images, info = await _extras(body, call, items)
    return {"html_info": info, "images": images}

"""Our upscaling routes: ``GET /upscalers`` (what a request may name) and ``POST /upscale`` (one image
to an exact size or by a factor, with a model from model_store/upscalers/ or a plain resize)."""

from __future__ import annotations

import base64
import io
import time
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field, model_validator

from service import image_gate
from service.image_gate import MAX_B64_CHARS, ImageInputError
from service.models.upscalers import LATENT_UPSCALE_MODES, Upscalers
from service.models.upscalers.resize import from_pil, to_pil
from service.sampling.errors import InputError
from service.serving.service import Service

from ..deps import get_state, require_api_key

router = APIRouter(tags=["upscale"], dependencies=[Depends(require_api_key)])


class UpscaleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    image: str = Field(max_length=MAX_B64_CHARS + 512, description="base64 or a data URL: PNG, JPEG or WebP")
    upscaler: str = Field("Lanczos", max_length=256, description="a name from GET /upscalers")
    scale: float | None = Field(None, gt=0, le=16, description="output = input size x scale (rounded)")
    width: int | None = Field(None, ge=1, le=65536, description="output width (height alone: aspect kept)")
    height: int | None = Field(None, ge=1, le=65536, description="output height (width alone: aspect kept)")

    @model_validator(mode="after")
    def _one_size(self) -> UpscaleRequest:
        if self.scale is None and self.width is None and self.height is None:
            self.scale = 2.0
        elif self.scale is not None and (self.width is not None or self.height is not None):
            raise ValueError("give scale, or width and/or height, not both")
        return self


class UpscaleResponse(BaseModel):
    image: str = Field(description="base64 PNG")
    width: int
    height: int
    upscaler: str
    timings: dict[str, float]


def _target(req: UpscaleRequest, w: int, h: int) -> tuple[int, int]:
    if req.scale is not None:
        return max(1, round(h * req.scale)), max(1, round(w * req.scale))
    if req.width is not None and req.height is not None:
        return req.height, req.width
    if req.width is not None:
        return max(1, round(h * req.width / w)), req.width
    assert req.height is not None
    return req.height, max(1, round(w * req.height / h))


def _upscale(req: UpscaleRequest, ups: Upscalers) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        img = image_gate.load(req.image, "image").image
    except ImageInputError as exc:
        raise InputError(exc.field, exc.message, exc.allowed) from exc
    size = _target(req, img.width, img.height)
    t1 = time.perf_counter()
    out = to_pil(ups.upscale(from_pil(img), req.upscaler, size=size, field="upscaler"))
    t2 = time.perf_counter()
    buf = io.BytesIO()
    out.save(buf, format="PNG", compress_level=1)
    timings = {"decode_s": t1 - t0, "upscale_s": t2 - t1, "encode_s": time.perf_counter() - t2}
    return {
        "image": base64.b64encode(buf.getvalue()).decode(),
        "width": out.width,
        "height": out.height,
        "upscaler": req.upscaler,
        "timings": {k: round(v, 4) for k, v in timings.items()},
    }


@router.get("/upscalers")
async def upscalers(state: Service = Depends(get_state)) -> dict[str, Any]:
    """Upscalers a request may name (``upscaler`` here, A1111's ``upscaler_1/2`` and ``hr_upscaler``):
    the plain resizes and the model files in model_store/upscalers/ with their family and own scale;
    plus the latent modes the hires fix takes."""
    items = await state.pool.upscalers.call(state.pool.upscalers.items)
    return {
        "upscalers": [
            {"name": i.name, "family": i.family, "scale": i.scale, "file": i.path.name if i.path else None}
            for i in items
        ],
        "latent_upscale_modes": list(LATENT_UPSCALE_MODES),
    }


@router.post("/upscale", response_model=UpscaleResponse)
async def upscale(req: UpscaleRequest, state: Service = Depends(get_state)) -> dict[str, Any]:
    """One image to ``scale`` x its size or to ``width`` x ``height`` (exactly): a model upscaler runs
    its passes (tiled, batched with other requests' tiles) until the image covers the size, then a
    Lanczos resize to it; ``Lanczos`` / ``Nearest`` / ``None`` (= Lanczos) resize directly.
    Unknown upscaler: 422 listing the available ones."""
    return await state.pool.upscalers.call(_upscale, req, state.pool.upscalers)

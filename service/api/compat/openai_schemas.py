"""OpenAI Images API bodies (``POST /v1/images/generations``; edits are multipart, same fields).

Besides OpenAI's fields, requests may carry ours (``seed``, ``negative_prompt``, ``steps``,
``sampler``, ``schedule``, ``cfg_scale``, ``denoise``): the OpenAI SDKs send them through
``extra_body``; so may the conditioning fields of ours that OpenAI has no name for (``guidance``, ...:
``GenerationRequest``'s ``frontends`` fields). Other unknown fields are ignored."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

OutputFormat = Literal["png", "jpeg", "webp"]


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(
        extra="allow", protected_namespaces=(), allow_inf_nan=False
    )  # extras: frontend_fields

    prompt: str = Field(max_length=32_000)
    model: str | None = Field(None, max_length=128)
    n: int = Field(1, ge=1, le=256, description="null: 1")
    size: str | None = Field(None, max_length=32, description='"WIDTHxHEIGHT" or "auto"')
    response_format: Literal["url", "b64_json"] | None = None
    quality: Literal["low", "medium", "high", "xhigh", "max", "auto", "standard", "hd"] | None = Field(
        None,
        description="low: half the model's steps; medium|standard|auto: its steps; high|hd: twice; xhigh: "
        "three times; max: four times (at most KDIFF_MAX_STEPS)",
    )
    style: Literal["vivid", "natural"] | None = Field(None, description="DALL-E 3's: accepted, ignored")
    user: str | None = Field(None, max_length=256, description="accepted, ignored")
    seed: int | None = Field(None, ge=0, lt=2**63)
    negative_prompt: str | None = Field(None, max_length=4000)
    steps: int | None = Field(None, ge=1, le=10_000)
    sampler: str | None = Field(None, max_length=64)
    schedule: str | None = Field(None, max_length=64)
    cfg_scale: float | None = Field(None, ge=0.0, le=50.0)
    denoise: float | None = Field(None, gt=0.0, le=1.0, description="edits without a mask: img2img strength")
    stream: bool = Field(False, description="true: text/event-stream of OpenAI's image events")
    partial_images: int | None = Field(
        None, ge=0, le=3, description="with stream: partial images (the first image at evenly spread steps)"
    )
    output_format: OutputFormat | None = Field(None, description="null: png")
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg/webp quality; null: 100")
    background: Literal["transparent", "opaque", "auto"] | None = Field(
        None, description="transparent: refused (our models paint every pixel)"
    )
    moderation: Literal["low", "auto"] | None = Field(None, description="accepted, ignored")
    input_fidelity: Literal["high", "low"] | None = Field(None, description="edits: accepted, ignored")
    safety_identifier: str | None = Field(None, max_length=256, description="echoed, else ignored")

    @field_validator("n", mode="before")
    @classmethod
    def _n_null_is_one(cls, value: Any) -> Any:
        # OpenAI takes "n": null as the default (the openai client sends it for n=None)
        return 1 if value is None else value


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    background: Literal["opaque"] = "opaque"
    output_format: OutputFormat = "png"
    quality: str
    size: str
    usage: dict[str, Any]
    safety_identifier: str | None = None


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kdiffusion-service"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


def form_fields(form: Any) -> dict[str, Any]:
    """The text fields of a multipart form (files excluded), for ImageGenerationRequest."""
    return {k: v for k, v in form.items() if isinstance(v, str) and k not in ("image", "image[]", "mask")}

"""Request and response bodies of the HTTP API (documented at /docs)."""

from __future__ import annotations

import dataclasses
from copy import copy
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_type_hints

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    create_model,
    field_validator,
)

from service.image_gate import MAX_B64_CHARS, GatedImage
from service.models.stepcache import CacheSpec
from service.sampling.errors import InputError
from service.sampling.request import TOP_LEVEL_OPTIONS  # noqa: F401  (re-exported)
from service.sampling.spec import MAX_STEPS
from service.serving.errors import ErrorCode
from service.serving.hires import HiresFix, hr_option
from service.serving.request import MAX_SIDE, GenerationRequest, request_fields
from service.serving.request import ControlNetRef as ServingControlNet
from service.serving.request import IPAdapterRef as ServingIPAdapter
from service.serving.request import LoraRef as ServingLora
from service.serving.request import UnionImage as ServingUnionImage

FIELDS = {f.name: f for f in request_fields() if f.metadata["http"]}  # the HTTP body's fields

Number = float | int


def _text_or_gated(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    return value if isinstance(value, GatedImage) else handler(value)


# An image field: base64 text (or a data: URL) from a client, or, from the A1111 / OpenAI
# translators only (JSON cannot make one), an image that already passed service/image_gate.py as a
# GatedImage, so an upload is neither re-encoded nor decoded twice. Clients see a string field.
# Left out of model_dump (exclude): recorded parameters and logs must not carry an image.
ImageField = Annotated[
    str | None, Field(max_length=MAX_B64_CHARS, exclude=True), WrapValidator(_text_or_gated)
]
OptionValue = float | int | str


class LoraRef(BaseModel):
    """One LoRA of a request (GET /loras lists them)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str = Field(max_length=128, description="LoRA name (its file name without .safetensors)")
    weight: float = Field(1.0, ge=-10.0, le=10.0, description="strength (1 = as trained)")


class HiresBody(BaseModel):
    """A1111's hires fix (``GET /sdapi/v1/upscalers`` and ``/latent-upscale-modes`` list upscalers)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    scale: float | None = Field(None, gt=0.0, le=8.0, description="upscale by (default 2)")
    resize_x: int | None = Field(None, ge=0, le=MAX_SIDE, description="width to resize to (0: unset)")
    resize_y: int | None = Field(None, ge=0, le=MAX_SIDE, description="height to resize to (0: unset)")
    upscaler: str | None = Field(None, max_length=128, description="default 'Latent'")
    steps: int | None = Field(None, ge=0, le=MAX_STEPS, description="second pass steps (0: the first's)")
    denoise: float | None = Field(None, gt=0.0, le=1.0, description="second pass strength (default 0.75)")
    sampler: str | None = Field(None, max_length=64, description="default: the first pass's")
    schedule: str | None = Field(None, max_length=64, description="default: the first pass's")
    prompt: str | None = Field(None, max_length=4000, description="default: the first pass's")
    negative_prompt: str | None = Field(None, max_length=4000, description="default: the first pass's")


class CacheBody(BaseModel):
    """A request's step cache (docs/STEP_CACHE.md); off when absent."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    method: str = Field(max_length=32, description="deepcache (UNets) | fbcache (SD3 / Flux)")
    interval: int | None = Field(
        None, ge=1, le=1000, description="deepcache: a full step every N (default 3)"
    )
    threshold: float | None = Field(
        None, ge=0.0, le=10.0, description="full step when the probe moved more than this (relative)"
    )
    start: int | None = Field(
        None, ge=0, le=10000, description="evaluations that run in full before the cache may act (default 0)"
    )
    level: int | None = Field(
        None, ge=0, le=12, description="deepcache on SD UNets: the split's skip connection (default 1)"
    )


class UnionImageBody(BaseModel):
    """One more control image of a union ControlNet unit."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    image: ImageField = Field(None, description="base64 control image")
    control_type: str | int | None = Field(None, description="its control type (as the unit's)")
    module: str = Field("none", max_length=64, description="its preprocessor")


class ControlNetRef(BaseModel):
    """One ControlNet unit of a request (GET /controlnet/model_list, /controlnet/module_list)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, protected_namespaces=())
    model: str = Field(max_length=256, description="ControlNet name (GET /controlnet/model_list)")
    image: ImageField = Field(None, description="base64 control image (resized per resize_mode)")
    weight: float = Field(1.0, ge=-10.0, le=10.0, description="strength of its residuals")
    guidance_start: float = Field(0.0, ge=0.0, le=1.0, description="first step fraction it acts at")
    guidance_end: float = Field(1.0, ge=0.0, le=1.0, description="last step fraction it acts at")
    control_mode: str | int = Field(
        "balanced", description="balanced | prompt | control, A1111's names, or 0-2"
    )
    resize_mode: str | int = Field(
        "crop_and_resize",
        description="just_resize | crop_and_resize | resize_and_fill, A1111's names, or 0-2",
    )
    mask: ImageField = Field(None, description="effective region: white = controlled")
    module: str = Field("none", max_length=64, description="preprocessor (GET /controlnet/module_list)")
    processor_res: int | None = Field(
        None, ge=64, le=2048, description="preprocessor resolution (short side)"
    )
    threshold_a: float | None = Field(None, ge=-1e4, le=1e4, description="preprocessor parameter a")
    threshold_b: float | None = Field(None, ge=-1e4, le=1e4, description="preprocessor parameter b")
    pixel_perfect: bool = Field(False, description="preprocessor resolution from the generation size")
    control_type: str | int | None = Field(
        None,
        description="union ControlNets: the image's control type (SDXL: openpose, depth, softedge, canny, "
        "normal, segment, tile, repaint; ComfyUI's and A1111's names; 0-7; default auto; Flux union: "
        "canny, tile, depth, blur, pose, gray, lq or its number, required)",
    )
    images: list[UnionImageBody] = Field(
        default_factory=list,
        max_length=3,
        description="union ControlNets: more control images with their types",
    )
    hr_option: str = Field(
        "both",
        max_length=32,
        description="with a hires fix, the passes it acts in: both | low_res_only | high_res_only "
        "(A1111's Both, Low res only, High res only); without one it acts in the one pass",
    )

    @field_validator("hr_option")
    @classmethod
    def _hr_option(cls, value: str) -> str:
        try:
            return hr_option(value, "hr_option")
        except InputError as exc:
            raise ValueError(exc.message) from exc

    def serving(self) -> ServingControlNet:
        fields = {k: getattr(self, k) for k in type(self).model_fields}
        fields["images"] = tuple(ServingUnionImage(i.image, i.control_type, i.module) for i in self.images)
        return ServingControlNet(**fields)


def _field_of(model: type[BaseModel], name: str) -> Any:
    """Another body's field (default, bounds, description), for a field that means the same."""
    return copy(model.model_fields[name])


class IPAdapterRef(BaseModel):
    """One IP-Adapter image of a request (an adapter in the store's ipadapter/ folder)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, protected_namespaces=())
    model: str = Field(max_length=256, description="IP-Adapter name (its file name without the suffix)")
    image: ImageField = Field(None, description="base64 image prompt (a reference face, style, object)")
    weight: float = Field(1.0, ge=-10.0, le=10.0, description="strength of the image prompt")
    # the step window, as a ControlNet unit's
    guidance_start: float = _field_of(ControlNetRef, "guidance_start")
    guidance_end: float = _field_of(ControlNetRef, "guidance_end")

    def serving(self) -> ServingIPAdapter:
        return ServingIPAdapter(self.model, self.image, self.weight, self.guidance_start, self.guidance_end)


def field_of(name: str) -> Any:
    """The pydantic Field of a GenerationRequest field: its default, bounds and doc."""
    f = FIELDS[name]
    meta = {"description": f.metadata["doc"], **f.metadata["bounds"]}
    if f.default_factory is not dataclasses.MISSING:
        return Field(default_factory=f.default_factory, **meta)
    return Field(f.default, **meta)


# SampleRequest's fields are serving's GenerationRequest's, each with its type, default, bounds and
# doc (built by _sample_request below: a new request field needs no line here).
class _SampleRequest(BaseModel):
    """One generation request. Unknown fields are rejected (422)."""

    model_config = ConfigDict(
        extra="forbid",
        protected_namespaces=(),
        allow_inf_nan=False,  # 1e400, NaN and Infinity parse as JSON numbers: refuse them here
        json_schema_extra={"examples": [{"model": "digits", "class_label": 7, "steps": 20, "seed": 1}]},
    )

    def request(self) -> GenerationRequest:
        """The serving layer's request for this body."""
        values = {name: getattr(self, name) for name in type(self).model_fields}
        if values.get("loras") is not None:
            values["loras"] = [ServingLora(ref.name, ref.weight) for ref in values["loras"]]
        if values.get("hires") is not None:
            values["hires"] = HiresFix(**values["hires"].model_dump())
        if values.get("controlnets") is not None:
            values["controlnets"] = [unit.serving() for unit in values["controlnets"]]
        if values.get("ip_adapters") is not None:
            values["ip_adapters"] = [ref.serving() for ref in values["ip_adapters"]]
        if values.get("cache") is not None:
            values["cache"] = CacheSpec(**values["cache"].model_dump())
        return GenerationRequest(**values)


# The HTTP types where they are not the dataclass's own: LoRAs validated as LoraRef bodies, images as
# base64 text (or a translator's GatedImage) kept out of model_dump.
HTTP_TYPES: dict[str, Any] = {
    "loras": list[LoraRef] | None,
    "hires": HiresBody | None,
    "controlnets": list[ControlNetRef] | None,
    "ip_adapters": list[IPAdapterRef] | None,
    "cache": CacheBody | None,
    "init_image": ImageField,
    "mask": ImageField,
}


def _sample_request() -> type[_SampleRequest]:
    hints = get_type_hints(GenerationRequest)
    fields: dict[str, Any] = {name: (HTTP_TYPES.get(name, hints[name]), field_of(name)) for name in FIELDS}
    model = create_model("SampleRequest", __base__=_SampleRequest, __module__=__name__, **fields)
    model.__doc__ = _SampleRequest.__doc__
    return model


if TYPE_CHECKING:
    SampleRequest = _SampleRequest
else:
    SampleRequest = _sample_request()


def generation_request(fields: dict[str, Any]) -> GenerationRequest:
    """A front end's translated fields, checked against the bounds (as a body of POST /sample would
    be), as the serving layer's request."""
    return SampleRequest.model_validate(fields).request()


class Timings(BaseModel):
    queue_s: float | None = Field(default=None, description="time waiting for admission")
    run_s: float | None = Field(default=None, description="time sampling")
    encode_s: float | None = Field(default=None, description="time decoding and encoding PNGs")
    total_s: float | None = Field(default=None, description="submission to result")


class SampleResponse(BaseModel):
    images: list[str] = Field(description="base64 PNGs, each carrying its parameters in a text chunk")
    seeds: list[int] = Field(description="the seed of each image")
    parameters: dict[str, Any] = Field(description="everything needed to reproduce the images")
    timings: Timings


class JobProgress(BaseModel):
    step: int = Field(description="sampler steps completed (slowest image)")
    total: int = Field(description="sampler steps requested")
    fraction: float = Field(description="model evaluations done / expected, in [0, 1]")
    eta_s: float | None = Field(default=None, description="estimated seconds left")


class JobErrorBody(BaseModel):
    code: str = Field(description=" | ".join(ErrorCode))  # the one list (engine/codes.py)
    message: str


class WebhookAttemptView(BaseModel):
    at: float = Field(description="unix time the attempt started")
    duration_s: float
    status_code: int | None = Field(default=None, description="the receiver's HTTP status, if it answered")
    error: str | None = Field(default=None, description="why the attempt failed (null: delivered)")


class WebhookView(BaseModel):
    id: str = Field(description="the delivery id (also the Kdiff-Delivery header)")
    url: str
    event: str = Field(description="job.succeeded | job.failed | job.cancelled")
    state: Literal["pending", "delivered", "failed"]
    attempt_count: int
    next_attempt_at: float | None = Field(default=None, description="unix time of the next retry")
    attempts: list[WebhookAttemptView] = Field(description="the latest attempts, oldest first")


class JobView(BaseModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    model: str
    created_at: float = Field(description="unix time of submission")
    queue_position: int | None = Field(default=None, description="1-based position while queued")
    progress: JobProgress
    result: SampleResponse | None = None
    error: JobErrorBody | None = None
    webhooks: list[WebhookView] | None = Field(
        default=None, description="webhook deliveries of this job (callback_url) and their attempts"
    )


class JobCreated(BaseModel):
    id: str
    status: str
    urls: dict[str, str] = Field(description="job, events (SSE) and cancel URLs")

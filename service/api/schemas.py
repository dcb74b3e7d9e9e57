"""Request and response bodies of the HTTP API (documented at /docs)."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidatorFunctionWrapHandler, WrapValidator

from service.image_gate import MAX_B64_CHARS, GatedImage
from service.sampling.request import TOP_LEVEL_OPTIONS  # noqa: F401  (re-exported)
from service.serving.request import GenerationRequest, request_fields
from service.serving.request import LoraRef as ServingLora

FIELDS = {f.name: f for f in request_fields()}

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


def field_of(name: str) -> Any:
    """The pydantic Field of a GenerationRequest field: its default, bounds and doc."""
    f = FIELDS[name]
    meta = {"description": f.metadata["doc"], **f.metadata["bounds"]}
    if f.default_factory is not dataclasses.MISSING:
        return Field(default_factory=f.default_factory, **meta)
    return Field(f.default, **meta)


class SampleRequest(BaseModel):
    """One generation request. Unknown fields are rejected (422). The fields, their bounds and docs are
    serving's GenerationRequest (``field_of``); tests/serving/test_request.py checks the two lists match."""

    model_config = ConfigDict(
        extra="forbid",
        protected_namespaces=(),
        allow_inf_nan=False,  # 1e400, NaN and Infinity parse as JSON numbers: refuse them here
        json_schema_extra={"examples": [{"model": "digits", "class_label": 7, "steps": 20, "seed": 1}]},
    )

    model: str | None = field_of("model")
    sampler: str | None = field_of("sampler")
    schedule: str | None = field_of("schedule")
    sigmas: list[float] | None = field_of("sigmas")
    steps: int | None = field_of("steps")
    seed: int | list[int] | None = field_of("seed")
    n: int | None = field_of("n")
    subseed: int | None = field_of("subseed")
    subseed_strength: float | None = field_of("subseed_strength")
    clip_skip: int | None = field_of("clip_skip")
    cfg_scale: float | None = field_of("cfg_scale")
    class_label: int | list[int] | None = field_of("class_label")
    prompt: str | None = field_of("prompt")
    loras: list[LoraRef] | None = field_of("loras")
    negative_prompt: str | None = field_of("negative_prompt")
    width: int | None = field_of("width")
    height: int | None = field_of("height")
    init_image: ImageField = field_of("init_image")
    denoise: float | None = field_of("denoise")
    mask: ImageField = field_of("mask")
    eta: float | None = field_of("eta")
    s_noise: float | None = field_of("s_noise")
    s_churn: float | None = field_of("s_churn")
    s_tmin: float | None = field_of("s_tmin")
    s_tmax: float | None = field_of("s_tmax")
    r: float | None = field_of("r")
    order: int | None = field_of("order")
    solver_type: str | None = field_of("solver_type")
    rho: float | None = field_of("rho")
    sigma_min: float | None = field_of("sigma_min")
    sigma_max: float | None = field_of("sigma_max")
    shift: float | None = field_of("shift")
    guidance: float | None = field_of("guidance")
    crops_coords_top_left: list[int] | None = field_of("crops_coords_top_left")
    sampler_options: dict[str, OptionValue] = field_of("sampler_options")
    schedule_options: dict[str, OptionValue] = field_of("schedule_options")
    timeout_s: float | None = field_of("timeout_s")
    guidance_rescale: float | None = field_of("guidance_rescale")

    def request(self) -> GenerationRequest:
        """The serving layer's request for this body."""
        values = {name: getattr(self, name) for name in type(self).model_fields}
        if self.loras is not None:
            values["loras"] = [ServingLora(ref.name, ref.weight) for ref in self.loras]
        return GenerationRequest(**values)


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
    code: str = Field(
        description="invalid_input | non_finite | model_error | deadline_exceeded | shutdown | internal"
    )
    message: str


class JobView(BaseModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    model: str
    created_at: float = Field(description="unix time of submission")
    queue_position: int | None = Field(default=None, description="1-based position while queued")
    progress: JobProgress
    result: SampleResponse | None = None
    error: JobErrorBody | None = None


class JobCreated(BaseModel):
    id: str
    status: str
    urls: dict[str, str] = Field(description="job, events (SSE) and cancel URLs")

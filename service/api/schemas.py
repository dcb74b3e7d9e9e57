"""Request and response bodies of the HTTP API (documented at /docs)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidatorFunctionWrapHandler, WrapValidator

from service.image_gate import MAX_B64_CHARS, GatedImage
from service.sampling.request import TOP_LEVEL_OPTIONS  # noqa: F401  (re-exported)

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


class SampleRequest(BaseModel):
    """One generation request. Unknown fields are rejected (422)."""

    model_config = ConfigDict(
        extra="forbid",
        protected_namespaces=(),
        allow_inf_nan=False,  # 1e400, NaN and Infinity parse as JSON numbers: refuse them here
        json_schema_extra={"examples": [{"model": "digits", "class_label": 7, "steps": 20, "seed": 1}]},
    )

    model: str | None = Field(
        None, max_length=64, description="model name (GET /models); default: the service's"
    )
    sampler: str | None = Field(
        None, max_length=64, description="sampler name (GET /samplers); default: model's"
    )
    schedule: str | None = Field(default=None, max_length=64, description="sigma schedule (GET /schedules)")
    sigmas: list[float] | None = Field(
        default=None,
        min_length=1,
        max_length=10_001,
        description="your own strictly descending sigmas (a final 0 is added when missing), as ComfyUI's "
        "SamplerCustom takes them: replaces schedule (or schedule 'custom'), sets steps, and for img2img "
        "the first sigma sets the strength (leave denoise unset)",
    )
    steps: int | None = Field(
        default=None, ge=1, le=10_000, description="sampler steps (bounded by the service)"
    )
    seed: int | list[int] | None = Field(
        None, description="one int (image i gets seed+i) or one per image; default: random"
    )
    n: int | None = Field(
        None, ge=1, le=256, description="number of images (bounded by the service); default 1"
    )
    subseed: int | None = Field(
        None, ge=0, lt=2**63, description="variation seed (A1111's subseed; image i gets subseed+i)"
    )
    subseed_strength: float | None = Field(
        None, ge=0.0, le=1.0, description="how far each start noise moves towards its subseed's (slerp)"
    )
    clip_skip: int | None = Field(
        None, ge=1, le=12, description="text models: stop CLIP this many layers from the end (1 = last)"
    )
    cfg_scale: float | None = Field(
        None, ge=0.0, le=50.0, description="classifier-free guidance scale (1 = off)"
    )
    class_label: int | list[int] | None = Field(
        None, description="class for class-conditional models (one, or one per image); none = unconditional"
    )
    prompt: str | None = Field(
        default=None,
        max_length=4000,
        description="text prompt (text-conditional models); A1111's <lora:name:weight> tags apply LoRAs",
    )
    loras: list[LoraRef] | None = Field(
        None, max_length=4, description="LoRAs applied to this request only (it still shares batches)"
    )
    negative_prompt: str | None = Field(
        default=None, max_length=4000, description="negative prompt (text models)"
    )
    width: int | None = Field(default=None, ge=8, le=4096, description="image width, where the model allows")
    height: int | None = Field(
        default=None, ge=8, le=4096, description="image height, where the model allows"
    )
    init_image: ImageField = Field(
        None, description="base64 PNG/JPEG/WebP start image for img2img (or a data: URL)"
    )
    denoise: float | None = Field(
        None, gt=0.0, le=1.0, description="img2img strength in (0, 1]; 1 = from noise"
    )
    mask: ImageField = Field(
        None,
        description="base64 grayscale inpainting mask (white = repaint); needs init_image",
    )
    eta: float | None = Field(
        default=None, description="ancestral / SDE noise amount (samplers that take it)"
    )
    s_noise: float | None = Field(default=None, description="noise scale (samplers that take it)")
    s_churn: float | None = Field(default=None, description="Karras churn (euler, heun, dpm_2)")
    s_tmin: float | None = Field(default=None, description="churn sigma range start")
    s_tmax: float | None = Field(default=None, description="churn sigma range end")
    r: float | None = Field(default=None, description="dpmpp_sde step ratio")
    order: int | None = Field(default=None, description="lms / dpm_adaptive order")
    solver_type: str | None = Field(default=None, max_length=16, description="dpmpp_2m_sde: midpoint | heun")
    rho: float | None = Field(default=None, description="schedule rho (karras, polyexponential)")
    sigma_min: float | None = Field(default=None, description="schedule sigma_min (default: the model's)")
    sigma_max: float | None = Field(default=None, description="schedule sigma_max (default: the model's)")
    shift: float | None = Field(
        default=None, description="schedule 'flow' (SD3 / Flux): timestep shift (default: the model's)"
    )
    guidance: float | None = Field(
        default=None, ge=0.0, le=100.0, description="Flux-dev: distilled guidance (default: the model's)"
    )
    sampler_options: dict[str, OptionValue] = Field(
        default_factory=dict, max_length=32, description="further sampler options by name (GET /samplers)"
    )
    schedule_options: dict[str, OptionValue] = Field(
        default_factory=dict, max_length=32, description="further schedule options by name (GET /schedules)"
    )
    timeout_s: float | None = Field(default=None, gt=0, description="deadline in seconds (queue time counts)")
    guidance_rescale: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="CFG rescale (Lin et al. 2023; diffusers' guidance_rescale, ComfyUI's RescaleCFG): "
        "0 = plain CFG, 0.7 is the paper's choice; only with cfg_scale != 1",
    )


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

"""Request and response bodies of the A1111-compatible routes (field names and types as A1111's
``modules/api/models.py``). Unknown fields are accepted and ignored, as A1111 does (nested at most
``limits.MAX_DEPTH`` deep, checked by the routes). Numbers must be finite: 1e400, NaN and Infinity
(which Python's JSON parser reads) are a 422 naming the field."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from service.image_gate import MAX_B64_CHARS
from service.sampling.spec import MAX_NOISE_MULTIPLIER

# A null where A1111 reads the field as it stands: `get_fixed_seed` takes a null seed as -1 (random);
# flags are read as `if p.flag:` (and `send_images = args.pop("send_images", True)`), so a null one
# is false; the other ints here fall back to their defaults. Every processing field in A1111's API
# model is Optional, and clients generated from its schema send nulls for what they leave unset.
NULL_AS = {
    "seed": -1,
    "subseed": -1,
    "enable_hr": False,
    "send_images": False,
    "save_images": False,
    "override_settings_restore_afterwards": False,
}
IMG2IMG_NULL_AS = {
    "resize_mode": 0,
    "inpainting_fill": 0,
    "inpaint_full_res": False,
    "inpaint_full_res_padding": 0,
    "inpainting_mask_invert": 0,
    "include_init_images": False,
}


def _null_as(table: dict[str, Any], value: Any, info: ValidationInfo) -> Any:
    return table[info.field_name] if value is None and info.field_name is not None else value


MAX_IMAGE_B64 = MAX_B64_CHARS  # one base64 image field, the gate's bound (the body limit allows two)
ImageB64 = Annotated[str, Field(max_length=MAX_IMAGE_B64)]


class Txt2ImgRequest(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=(), allow_inf_nan=False)

    prompt: str = Field("", max_length=4000)
    negative_prompt: str = Field("", max_length=4000)
    styles: list[Annotated[str, Field(max_length=256)]] | None = Field(None, max_length=64)
    seed: int = Field(-1, ge=-1, lt=2**63, description="-1 = random")
    subseed: int = Field(-1, ge=-1, lt=2**63, description="variation seed; -1 = random")
    subseed_strength: float = Field(0.0, ge=0.0, le=1.0)
    sampler_name: str | None = Field(None, max_length=64)
    sampler_index: str | None = Field(None, max_length=64, description="older clients' sampler_name")
    scheduler: str | None = Field(None, max_length=64)
    batch_size: int = Field(1, ge=1, le=256)
    n_iter: int = Field(1, ge=1, le=256)
    steps: int | None = Field(None, ge=1, le=10_000, description="default: the model's")
    cfg_scale: float | None = Field(None, ge=0.0, le=50.0, description="default: the model's")
    width: int = Field(512, ge=8, le=8192)
    height: int = Field(512, ge=8, le=8192)
    # A1111's sampler settings (webuiapi sends them with every request); bounds generous around
    # A1111's own UI ranges; a value the chosen sampler does not take is ignored
    eta: float | None = Field(None, ge=0.0, le=100.0)
    s_churn: float | None = Field(None, ge=0.0, le=1000.0)
    s_tmax: float | None = Field(None, ge=0.0, le=1e4, description="0 = no upper limit")
    s_tmin: float | None = Field(None, ge=0.0, le=1e4)
    s_noise: float | None = Field(None, ge=0.0, le=10.0)
    denoising_strength: float | None = Field(None, ge=0.0, le=1.0)
    enable_hr: bool = False
    # hires fix (A1111's StableDiffusionProcessingTxt2Img; None: its default; a1111_hires.py)
    hr_scale: float | None = Field(2.0, ge=0.0, le=8.0, description="> 0 when enable_hr; read only then")
    hr_upscaler: str | None = Field(None, max_length=128, description="default 'Latent'")
    hr_second_pass_steps: int | None = Field(0, ge=0, le=10_000, description="0 = steps")
    hr_resize_x: int | None = Field(0, ge=0, le=8192)
    hr_resize_y: int | None = Field(0, ge=0, le=8192)
    hr_sampler_name: str | None = Field(None, max_length=64)
    hr_scheduler: str | None = Field(None, max_length=64)
    hr_prompt: str | None = Field("", max_length=4000)
    hr_negative_prompt: str | None = Field("", max_length=4000)
    hr_checkpoint_name: str | None = Field(None, max_length=256)
    restore_faces: bool | None = None
    tiling: bool | None = None
    override_settings: dict[str, Any] | None = None
    # false: the overrides stay in the caller's options afterwards (A1111's process_images restores
    # them only when this is set), and the returned images take their samples_format
    override_settings_restore_afterwards: bool = True
    send_images: bool = True
    save_images: bool = False
    script_name: str | None = Field(None, max_length=256)
    alwayson_scripts: dict[str, Any] | None = None

    @field_validator(*NULL_AS, mode="before")
    @classmethod
    def _a1111_null(cls, value: Any, info: ValidationInfo) -> Any:
        return _null_as(NULL_AS, value, info)


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[ImageB64] = Field(default_factory=list, max_length=64)
    mask: ImageB64 | None = None
    denoising_strength: float | None = Field(0.75, ge=0.0, le=1.0)
    resize_mode: int = Field(0, ge=0, le=3)
    # A1111: mask_blur, when given, sets both axes; else mask_blur_x / mask_blur_y (4 each)
    mask_blur: int | None = Field(None, ge=0, le=256)
    mask_blur_x: int | None = Field(None, ge=0, le=256)
    mask_blur_y: int | None = Field(None, ge=0, le=256)
    inpainting_fill: int = Field(0, ge=0, le=3)
    inpaint_full_res: bool | Annotated[int, Field(ge=0, le=1)] = True
    inpaint_full_res_padding: int = Field(0, ge=0, le=4096)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    include_init_images: bool = False
    # A1111's "Noise multiplier for img2img" (null: the option's, default 1)
    initial_noise_multiplier: float | None = Field(None, ge=0.0, le=MAX_NOISE_MULTIPLIER)

    @field_validator(*IMG2IMG_NULL_AS, mode="before")
    @classmethod
    def _a1111_img2img_null(cls, value: Any, info: ValidationInfo) -> Any:
        return _null_as(IMG2IMG_NULL_AS, value, info)


class ImageResponse(BaseModel):
    images: list[str] | None = Field(None, description="base64 PNGs")
    parameters: dict[str, Any]
    info: str = Field(description="A1111's JSON string: seed, all_seeds, infotexts, ...")


class PNGInfoRequest(BaseModel):
    image: str = Field(max_length=MAX_IMAGE_B64, description="base64 PNG, JPEG or WebP (or a data: URL)")


class PNGInfoResponse(BaseModel):
    info: str = Field(description="the infotext")
    items: dict[str, Any] = Field(description="the other text chunks")
    parameters: dict[str, Any] = Field(description="the infotext parsed")


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float = Field(description="in [0, 1]")
    eta_relative: float = Field(description="seconds left (estimate)")
    state: ProgressState
    current_image: str | None = Field(None, description="a small base64 PNG of the current prediction")
    textinfo: str | None = None

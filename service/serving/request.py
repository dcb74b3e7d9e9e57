"""THE list of request fields, and a request on a loaded model -> the engine's JobRequest.

:class:`GenerationRequest` is a plain dataclass: each field has its type, bounds and doc (the HTTP
schema takes its bounds and descriptions from here, ``api/schemas.py``), how it goes into a result's
recorded parameters (``record``), and whether front ends that do not name it (A1111, OpenAI) pass it
through from their bodies (``frontends``). :func:`build_job` checks a request against its model
(sampler, schedule and options through ``sampling/request.build_spec``; the model family's own inputs
through ``LoadedModel.job_inputs``; LoRAs) and builds the job's driver once, on the model's device.
Everything it refuses is an :class:`InputError` naming the request field.

A new conditioning field: add it here, use it in its model family's ``job_inputs``, add its line to
the HTTP schema; the PNG parameters and the A1111 / OpenAI routes carry it with no more edits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from service.engine.jobs import JobRequest
from service.image_gate import MAX_B64_CHARS, GatedImage
from service.models.lora import text_loras
from service.models.stepcache import KEY as CACHE_KEY
from service.models.stepcache import CacheSpec, cache_rows
from service.models.stepcache.support import cache_methods
from service.models.store import LoadedModel, Manifest
from service.models.tuned import TUNED, tuned_request
from service.sampling import registry
from service.sampling.driver import Driver
from service.sampling.errors import InputError
from service.sampling.request import TOP_LEVEL_OPTIONS, Limits, build_spec, spec_parameters
from service.sampling.spec import MAX_NOISE_MULTIPLIER, MAX_STEPS, SamplingSpec, make_sigmas, sampling_dtype

from . import latents
from .hires import HiresFix, pass_units, with_hires
from .latents import LatentInput
from .loras import lora_parameters, request_loras, with_adapters

# How a field goes into the recorded parameters: "spec" through the SamplingSpec (spec_parameters),
# "always" with its (resolved) value, "given" when it has one, "never" (images, deadlines, LoRAs:
# those are recorded by name and weight with the prompt's tags).
Record = Literal["spec", "always", "given", "never"]
MAX_SIDE = 4096


def request_field(
    doc: str,
    default: Any = None,
    *,
    record: Record = "given",
    frontends: bool = False,
    default_factory: Any = None,
    http: bool = True,
    **bounds: Any,
) -> Any:
    """A GenerationRequest field: ``bounds`` are pydantic's names (ge, le, gt, lt, min_length,
    max_length); ``frontends``: the A1111 and OpenAI routes pass it through from their bodies;
    ``http`` False: no HTTP body has it (a tensor only a front end in-process can make)."""
    meta = {"doc": doc, "bounds": bounds, "record": record, "frontends": frontends, "http": http}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class LoraRef:
    """One LoRA of a request (GET /loras lists them)."""

    name: str
    weight: float = 1.0


@dataclass(frozen=True)
class ControlNetRef:
    """One ControlNet unit of a request (GET /controlnet/model_list lists the models)."""

    model: str
    image: str | GatedImage | None = None
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: str | int = "balanced"  # balanced | prompt | control, A1111's names, or 0-2
    resize_mode: str | int = "crop_and_resize"  # just_resize | crop_and_resize | resize_and_fill, or 0-2
    mask: str | GatedImage | None = None  # effective region (white = controlled)
    module: str = "none"  # preprocessor (GET /controlnet/module_list)
    processor_res: int | None = None
    threshold_a: float | None = None
    threshold_b: float | None = None
    pixel_perfect: bool = False
    # union ControlNets (SDXL, Flux): the image's control type (None: auto), more images
    control_type: str | int | None = None
    images: tuple[UnionImage, ...] = ()
    # with a hires fix, the passes it acts in: both | low_res_only | high_res_only (A1111's names too)
    hr_option: str = "both"


@dataclass(frozen=True)
class UnionImage:
    """Another control image of a union ControlNet unit, with its control type and preprocessor."""

    image: str | GatedImage | None
    control_type: str | int | None = None
    module: str = "none"


@dataclass(frozen=True)
class IPAdapterRef:
    """One IP-Adapter image of a request (an adapter file in the store's ipadapter/ folder)."""

    model: str
    image: str | GatedImage | None = None
    weight: float = 1.0  # diffusers' set_ip_adapter_scale, A1111's unit weight
    guidance_start: float = 0.0  # A1111's unit window: the fraction of the steps it acts in
    guidance_end: float = 1.0


IP_ADAPTERS_DOC = (
    "IP-Adapter image prompts (model: a file in the store's ipadapter/ folder, image, weight, "
    "guidance_start, guidance_end) for this request only (it still shares batches)"
)
OPTION: Record = "spec"  # sampler / schedule options: recorded in the spec's options


@dataclass(frozen=True)
class GenerationRequest:
    """One generation request, as every front end hands it to the serving layer."""

    model: str | None = request_field(
        "model name (GET /models); default: the service's", record="always", max_length=64
    )
    sampler: str | None = request_field(
        "sampler name (GET /samplers); default: model's", record="spec", max_length=64
    )
    schedule: str | None = request_field("sigma schedule (GET /schedules)", record="spec", max_length=64)
    sigmas: list[float] | None = request_field(
        "your own strictly descending sigmas (a final 0 is added when missing), as ComfyUI's "
        "SamplerCustom takes them: replaces schedule (or schedule 'custom'), sets steps, and for img2img "
        "the first sigma sets the strength (leave denoise unset)",
        record="spec",
        min_length=1,
        max_length=MAX_STEPS + 1,
    )
    steps: int | None = request_field(
        "sampler steps (bounded by the service)", record="spec", ge=1, le=MAX_STEPS
    )
    seed: int | list[int] | None = request_field(
        "one int (image i gets seed+i) or one per image; default: random", record="spec"
    )
    n: int | None = request_field(
        "number of images (bounded by the service); default 1", record="always", ge=1, le=256
    )
    subseed: int | None = request_field(
        "variation seed (A1111's subseed; image i gets subseed+i)", record="spec", ge=0, lt=2**63
    )
    subseed_strength: float | None = request_field(
        "how far each start noise moves towards its subseed's (slerp)", record="spec", ge=0.0, le=1.0
    )
    clip_skip: int | None = request_field(
        "text models: stop CLIP this many layers from the end (1 = last)", ge=1, le=12
    )
    cfg_scale: float | None = request_field(
        "classifier-free guidance scale (1 = off)", record="always", ge=0.0, le=50.0
    )
    class_label: int | list[int] | None = request_field(
        "class for class-conditional models (one, or one per image); none = unconditional", record="always"
    )
    prompt: str | None = request_field(
        "text prompt (text-conditional models); A1111's <lora:name:weight> tags apply LoRAs",
        record="always",
        max_length=4000,
    )
    loras: list[LoraRef] | None = request_field(
        "LoRAs applied to this request only (it still shares batches)", record="never", max_length=4
    )
    controlnets: list[ControlNetRef] | None = request_field(
        "ControlNet units applied to this request only (it still shares batches): model, image, "
        "weight, guidance_start, guidance_end, control_mode, resize_mode, mask, module",
        record="never",
        frontends=True,
        max_length=3,
    )
    ip_adapters: list[IPAdapterRef] | None = request_field(
        IP_ADAPTERS_DOC, record="never", frontends=True, max_length=3
    )
    negative_prompt: str | None = request_field(
        "negative prompt (text models)", record="always", max_length=4000
    )
    width: int | None = request_field(
        "image width, where the model allows", record="always", ge=8, le=MAX_SIDE
    )
    height: int | None = request_field(
        "image height, where the model allows", record="always", ge=8, le=MAX_SIDE
    )
    init_image: str | GatedImage | None = request_field(
        "base64 PNG/JPEG/WebP start image for img2img (or a data: URL)",
        record="never",
        max_length=MAX_B64_CHARS,
    )
    denoise: float | None = request_field(
        "img2img strength in (0, 1]; 1 = from noise", record="spec", gt=0.0, le=1.0
    )
    noise_multiplier: float | None = request_field(
        "img2img: the start noise times this (A1111's initial_noise_multiplier); 1 = plain",
        record="spec",
        ge=0.0,
        le=MAX_NOISE_MULTIPLIER,
    )
    mask: str | GatedImage | None = request_field(
        "base64 grayscale inpainting mask (white = repaint); needs init_image",
        record="never",
        max_length=MAX_B64_CHARS,
    )
    eta: float | None = request_field("ancestral / SDE noise amount (samplers that take it)", record=OPTION)
    s_noise: float | None = request_field("noise scale (samplers that take it)", record=OPTION)
    s_churn: float | None = request_field("Karras churn (euler, heun, dpm_2)", record=OPTION)
    s_tmin: float | None = request_field("churn sigma range start", record=OPTION)
    s_tmax: float | None = request_field("churn sigma range end", record=OPTION)
    r: float | None = request_field("dpmpp_sde step ratio", record=OPTION)
    order: int | None = request_field("lms / dpm_adaptive order", record=OPTION)
    solver_type: str | None = request_field("dpmpp_2m_sde: midpoint | heun", record=OPTION, max_length=16)
    rho: float | None = request_field("schedule rho (karras, polyexponential)", record=OPTION)
    sigma_min: float | None = request_field("schedule sigma_min (default: the model's)", record=OPTION)
    sigma_max: float | None = request_field("schedule sigma_max (default: the model's)", record=OPTION)
    shift: float | None = request_field(
        "schedule 'flow' (SD3 / Flux): timestep shift (default: the model's)", record=OPTION
    )
    guidance: float | None = request_field(
        "Flux-dev: distilled guidance (default: the model's)", frontends=True, ge=0.0, le=100.0
    )
    crops_coords_top_left: list[int] | None = request_field(
        "SDXL micro-conditioning: the (top, left) crop of the training image to imitate, in pixels "
        "(default [0, 0]: centred, uncropped)",
        frontends=True,
        min_length=2,
        max_length=2,
    )
    sampler_options: dict[str, float | int | str] = request_field(
        "further sampler options by name (GET /samplers)", record="spec", default_factory=dict, max_length=32
    )
    schedule_options: dict[str, float | int | str] = request_field(
        "further schedule options by name (GET /schedules)",
        record="spec",
        default_factory=dict,
        max_length=32,
    )
    timeout_s: float | None = request_field("deadline in seconds (queue time counts)", record="never", gt=0)
    callback_url: str | None = request_field(
        "webhook: a signed POST to this URL when the job ends (succeeded, failed, cancelled); its host "
        "must be allowed by the service (KDIFF_WEBHOOK_ALLOW)",
        record="never",
        max_length=2048,
    )
    callback_progress_s: float | None = request_field(
        "with callback_url: also POST job.started, and job.progress at most once per this many "
        "seconds while the job runs (each tried once, never retried)",
        record="never",
        ge=1.0,
        le=3600.0,
    )
    guidance_rescale: float | None = request_field(
        "CFG rescale (Lin et al. 2023; diffusers' guidance_rescale, ComfyUI's RescaleCFG): "
        "0 = plain CFG, 0.7 is the paper's choice; only with cfg_scale != 1",
        record="spec",
        ge=0.0,
        le=1.0,
    )
    coefficients: list[float] | None = request_field(
        "a tuned solver's per-step coefficients (sampler ipndm_tuned, flat, step by step; schedule "
        "'tuned' sets them from the model's file and results record them)",
        record="spec",
        min_length=1,
        max_length=4000,
    )
    cache: CacheSpec | None = request_field(
        "step cache (training-free speed-up; off by default): {method: deepcache (UNets; interval N: "
        "a full step every N, default 3; or threshold) | fbcache (SD3 / Flux; threshold, default 0.1)}",
        record="never",  # recorded with its resolved values (build_job)
    )
    hires: HiresFix | None = request_field(
        "A1111's hires fix: after this request's pass, upscale (scale, or resize_x / resize_y; "
        "upscaler: a latent mode or a pixel upscaler) and run img2img there (steps, denoise, "
        "sampler, schedule, prompt, negative_prompt; default: the first pass's)",
        record="never",  # recorded with its resolved values (serving/hires.py)
    )
    latent: LatentInput | None = request_field(
        "ComfyUI's LATENT: start from these latents / run part of the schedule (serving/latents.py)",
        record="never",
        http=False,
    )

    def replace(self, **changes: Any) -> GenerationRequest:
        return dataclasses.replace(self, **changes)


def request_fields() -> Iterator[dataclasses.Field[Any]]:
    """GenerationRequest's fields, in order, each with its ``metadata`` (doc, bounds, record, frontends)."""
    yield from dataclasses.fields(GenerationRequest)


def frontend_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The fields a front end's body carries that the serving layer passes through by name
    (``frontends=True``: conditioning a front end has no name of its own for)."""
    return {f.name: body[f.name] for f in request_fields() if f.metadata["frontends"] and f.name in body}


def recorded_parameters(request: GenerationRequest, spec: SamplingSpec, resolved: dict[str, Any]) -> dict:
    """The parameters a result records, from the request's fields: the spec's (sampler, schedule,
    steps, seeds, options...), then every other field by its ``record`` kind, with the value the
    build settled (``resolved``: the model name, n, cfg, size, a family's defaults) where it did."""
    out: dict[str, Any] = {}
    for f in request_fields():
        kind = f.metadata["record"]
        value = resolved.get(f.name, getattr(request, f.name))
        if kind == "always" or (kind == "given" and value is not None):
            out[f.name] = value
        if f.name == "model":  # the spec's part follows the model, as results have always listed it
            out |= spec_parameters(spec)
    return out


@dataclass
class ModelInputs:
    """What a model family adds to a job (``LoadedModel.job_inputs``)."""

    cond: dict[str, Any]
    uncond: dict[str, Any] | None
    init: Any = None  # [n, C, h, w] clean start latents (img2img)
    mask: Any = None  # the inpainting mask the driver blends with
    latent_shape: tuple[int, ...] | None = None  # None: the model's own
    resolved: dict[str, Any] = dataclasses.field(default_factory=dict)  # fields the family settled


def check_spec(
    request: GenerationRequest, manifest: Manifest, limits: Limits, max_timeout_s: float, *, discrete: bool
) -> tuple[GenerationRequest, SamplingSpec, int, float]:
    """(request with a tuned schedule resolved, spec, images, timeout): the part of a request's
    checks that needs the model's manifest only (a request for a model still loading is checked so)."""
    d = manifest.model_defaults
    request = tuned_request(request, manifest.folder, manifest.name, d.sampler, d.steps)
    spec, n = build_spec(
        request, {"sampler": d.sampler, "schedule": d.schedule, "steps": d.steps}, limits, discrete
    )
    timeout = request.timeout_s or max_timeout_s
    if timeout > max_timeout_s:
        raise InputError("timeout_s", f"timeout_s must be in (0, {max_timeout_s:g}]")
    return request, spec, n, timeout


def build_job(
    request: GenerationRequest,
    model: LoadedModel,
    limits: Limits,
    max_timeout_s: float,
    upscalers: Any = None,
) -> JobRequest:
    """The engine job for ``request`` on ``model``: the spec (shared with ``kdiff sample``), the model
    family's own inputs, LoRAs, and the driver, built once here and run by the engine.
    ``upscalers``: the pool's upscaler models (a hires fix may name one)."""
    tagged, (request, loras) = request, request_loras(request, model)  # <lora:...> tags leave the prompt
    discrete = getattr(model.denoiser, "sigmas", None) is not None
    tuned = request.schedule == TUNED  # the model's tuned sigmas for its sampler and steps
    request, spec, n, timeout = check_spec(request, model.manifest, limits, max_timeout_s, discrete=discrete)
    cfg = request.cfg_scale if request.cfg_scale is not None else model.manifest.model_defaults.cfg_scale
    _check_conditioning_fields(request, model)
    start = request.latent
    if start is not None:  # ComfyUI's LATENT: its latents are the start, not an init image
        latents.check(request, start)
        spec = latents.with_window(spec, start)
    with text_loras(model, loras.text):
        denoise = 1.0 if start is not None and start.samples is not None else spec.denoise
        # the first pass's ControlNet units (a hires fix's "high res only" ones wait for the second)
        inputs = model.job_inputs(pass_units(request, second=False), n=n, cfg_scale=cfg, denoise=denoise)
    if start is not None:
        latents.start(start, inputs, model, n)
    if spec.noise_multiplier != 1.0 and inputs.init is None:
        raise InputError(
            "noise_multiplier", "noise_multiplier scales img2img's start noise; it needs init_image"
        )
    cond, uncond = with_adapters(model, inputs.cond, inputs.uncond, loras.unet, n)
    cond, uncond, cache = with_cache(request, model, cond, uncond, n)
    shape = (n, *(inputs.latent_shape or model.latent_shape))
    noise = latents.start_noise(start, shape)
    driver = start_driver(spec, model, shape, cond, uncond, cfg, inputs.init, inputs.mask, noise)
    model.bind_driver(driver)
    h, w = inputs.resolved.pop("image_size", model.image_size)
    resolved = {"model": model.name, "n": n, "cfg_scale": cfg, "width": w, "height": h, **inputs.resolved}
    params = recorded_parameters(request, spec, resolved)
    if request.hires is not None:  # the driver continues into the hires pass
        driver, params["hires"] = with_hires(
            request, model, driver, spec, limits, max_timeout_s, (h, w), loras, upscalers
        )
    params |= {"img2img": inputs.init is not None, "inpaint": inputs.mask is not None}
    params |= lora_parameters(tagged, model)
    if cache is not None:
        params["cache"] = cache.record()
    if tuned:
        params["schedule"] = TUNED
    return JobRequest(
        spec, n, cond, uncond, cfg, inputs.init, inputs.mask, timeout, params, inputs.latent_shape, driver
    )


def with_cache(
    request: GenerationRequest,
    model: LoadedModel,
    cond: dict[str, Any],
    uncond: dict[str, Any] | None,
    n: int,
) -> tuple[dict[str, Any], dict[str, Any] | None, CacheSpec | None]:
    """Every request to a model that can cache carries the per-row cache tensor (rows without a cache
    too: they share calls with cached rows, which decide per row); the guidance rows get their own."""
    methods = cache_methods(model.denoiser)
    spec = None if request.cache is None else request.cache.resolved(methods)
    if not methods:
        return cond, uncond, spec
    cond = {**cond, CACHE_KEY: cache_rows(spec, n)}
    return cond, None if uncond is None else {**uncond, CACHE_KEY: cache_rows(spec, n)}, spec


def _check_conditioning_fields(request: GenerationRequest, model: LoadedModel) -> None:
    """A pass-through conditioning field (``frontends``) the model's family does not read is refused,
    never silently dropped."""
    takes = model.conditioning_fields()
    for f in request_fields():
        if f.metadata["frontends"] and getattr(request, f.name) is not None and f.name not in takes:
            raise InputError(f.name, f"model {model.name!r} takes no {f.name}; omit it", [])


def start_driver(
    spec: SamplingSpec,
    model: LoadedModel,
    shape: tuple[int, ...],
    cond: dict[str, Any],
    uncond: dict[str, Any] | None,
    cfg: float,
    init: Any,
    mask: Any,
    noise: Any = None,
) -> Driver:
    """Build the job's driver now, on the model's device: the schedule and each sampler's set-up run
    up to its first model evaluation, so options that pass their own bounds but clash (sigma_min >=
    sigma_max, seeds_3's r_1 < r_2, sigmas that round into repeats) are this request's 422 rather
    than a failed job. The engine runs this same driver."""
    try:
        sigmas = make_sigmas(spec, model.denoiser, model.device)
        return Driver.start(
            spec,
            model.denoiser,
            shape,
            cond=cond,
            uncond=uncond,
            cfg_scale=cfg,
            init=init,
            mask=mask,
            device=model.device,
            dtype=sampling_dtype(model.dtype),
            sigmas=sigmas,
            noise=noise,
        )
    except InputError as exc:  # the core names the option (or steps / sigmas / schedule) at fault
        raise InputError(_request_field(exc.field, spec), exc.message, exc.allowed) from exc
    except ValueError as exc:
        raise InputError("sampler", f"sampler {spec.sampler!r}: {exc}") from exc


def _request_field(name: str, spec: SamplingSpec) -> str:
    """The request field for a name the core blamed: a top-level option, or the options dict it
    was given in (a schedule option left at its default: where it would be set), or the field itself
    (steps, schedule, sigmas)."""
    if name in TOP_LEVEL_OPTIONS:
        return name
    if name in spec.options:
        return "sampler_options"
    if name in spec.schedule_options or name in _schedule_options(spec):
        return "schedule_options"
    return name


def _schedule_options(spec: SamplingSpec) -> Mapping[str, Any]:
    """The options of the spec's named schedule (none for a schedule object: custom sigmas)."""
    info = registry.SCHEDULES.get(spec.schedule) if isinstance(spec.schedule, str) else None
    return {} if info is None else info.bounds

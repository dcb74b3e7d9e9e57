"""A sampler node -> our requests, run through the serving layer (so they batch with all traffic).

Every sampler node (KSampler, KSamplerAdvanced, SamplerCustom, SamplerCustomAdvanced) reduces to one
:class:`SampleCall`. What the prompt and size become is the model family's
(``LoadedModel.prompt_inputs``: the digits model reads its class from a digit in the positive
prompt, as on the A1111 routes); ComfyUI's sampler and scheduler spellings resolve through
``service.sampling.aliases``, and a discrete-timestep scheduler on a continuous-time model runs as
its equivalent (``service.frontend_schedules``), as on the A1111 routes.

Seeds: a ComfyUI seed is 0 .. 2**64 - 1. Image i of a batch gets our per-image seed
(seed + i) mod 2**63 (i: the latent's ``batch_index`` when it has one), so below 2**63 a workflow's
batch is /sample's ``seed`` with ``n`` images, and each image can be made again alone. (ComfyUI
draws a batch's noise as one tensor from one generator, so its image i depends on the batch size;
ours does not.)

Latents: a sampler's result is its model's latents (``Latent.samples``, read from the job's driver
when the job ends) with the engine's decoding of them; a sampler given such latents starts from
them (``service/serving/latents.py``). KSamplerAdvanced's window (start_at_step, end_at_step,
return_with_leftover_noise) and add_noise are ComfyUI's rules; a flow model's latents that keep
leftover noise are handed on divided by (1 - t), as ComfyUI's ``inverse_noise_scaling`` does, so
the next sampler's (1 - t) x + t noise start gives them back.
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from service.engine import Job, JobStatus
from service.frontend_schedules import for_model
from service.image_gate import GatedImage
from service.images import to_pil
from service.models.store import LoadedModel, PromptAsk
from service.sampling import aliases, registry
from service.sampling.errors import InputError
from service.sampling.spec import StepWindow
from service.serving.latents import LatentInput
from service.serving.request import ControlNetRef, GenerationRequest, IPAdapterRef, LoraRef

from .runtime import Interrupted, NodeRun, image_to_pil, mask_to_pil, pil_to_image, png_to_image
from .values import Conditioning, ControlUnit, Latent, ModelRef, SigmasRef

SEED_SPACE = 2**63  # our seeds: [0, 2**63)
POLL_S = 0.25  # progress / cancel check while a sampler's jobs run
PREVIEW_SIDE = 256
CANCEL_WAIT_S = 30.0  # an interrupted sampler waits this long for its jobs to stop


@dataclass(frozen=True)
class SampleCall:
    """What every sampler node asks for."""

    model: ModelRef
    positive: Conditioning
    negative: Conditioning | None
    cfg: float
    sampler: str
    sigmas: SigmasRef
    seed: int | None  # None: no noise seed (SamplerCustomAdvanced's DisableNoise)
    latent: Latent
    add_noise: bool = True  # KSamplerAdvanced's add_noise
    window: StepWindow | None = None  # KSamplerAdvanced's start_at_step / end_at_step / leftover noise

    @property
    def noisy(self) -> bool:
        return self.add_noise and self.seed is not None


def seeds_for(seed: int, n: int, batch_index: tuple[int, ...] | None = None) -> list[int]:
    """Our per-image seeds for a ComfyUI seed and a batch of n (see the module doc)."""
    index = batch_index if batch_index is not None and len(batch_index) == n else range(n)
    return [(seed + i) % SEED_SPACE for i in index]


def resolve_sampler(name: str) -> str:
    """Our sampler for a ComfyUI name: its aliases, and the ``_gpu`` variants (ComfyUI draws their
    Brownian noise on the GPU; ours is drawn where the model runs) as their base sampler."""
    try:
        return aliases.resolve(name)[0]
    except registry.UnknownNameError:
        if name.endswith("_gpu"):
            return aliases.resolve(name[: -len("_gpu")])[0]
        raise


def _names(call: SampleCall, model: LoadedModel) -> dict[str, Any]:
    """sampler, schedule (+ options) and steps for ``model``."""
    try:
        sampler = resolve_sampler(call.sampler)
        schedule = aliases.resolve_schedule(call.sigmas.schedule)
    except registry.UnknownNameError as exc:
        raise InputError(exc.kind, str(exc), exc.valid) from exc
    steps, denoise = call.sigmas.steps, call.sigmas.denoise
    schedule, options, _note = for_model(schedule, model, steps, denoise)
    options = {**options, **dict(call.sigmas.options)}
    out: dict[str, Any] = {"sampler": sampler, "schedule": schedule, "steps": steps}
    if options:
        out["schedule_options"] = options
    if call.model.shift is not None and schedule == "flow":  # ModelSamplingSD3 / Flux
        out["shift"] = call.model.shift
    if call.model.cache is not None:  # DeepCache / ApplyFBCacheOnModel
        out["cache"] = call.model.cache
    return out


def _conditioning(call: SampleCall, model: LoadedModel) -> dict[str, Any]:
    """The request fields the model family makes of the prompts, size and cfg."""
    for cond in (call.positive, call.negative):
        if cond is not None and cond.clip.name != model.name:
            raise InputError(
                "clip",
                f"the conditioning was encoded with {cond.clip.name!r}'s text encoder but the sampler's "
                f"model is {model.name!r}; use one checkpoint's MODEL and CLIP together",
                [model.name],
            )
    negative = call.negative.text if call.negative is not None else None
    clip_skip = call.positive.clip.clip_skip or 1
    size = (call.latent.width, call.latent.height)
    asked = model.prompt_inputs(PromptAsk(call.positive.text, negative or None, call.cfg, size, clip_skip))
    fields = dict(asked.fields)
    if call.negative is None:  # BasicGuider: no negative, no guidance
        fields["cfg_scale"] = 1.0
    guidance = call.positive.guidance
    if guidance is not None and "guidance" in model.conditioning_fields():
        fields["guidance"] = guidance
    loras = dict(call.model.loras) | dict(call.positive.clip.loras)
    if loras:
        fields["loras"] = [LoraRef(n, w) for n, w in loras.items()]
    if call.positive.controls:  # ControlNetApply(Advanced): ours act on cond and uncond rows alike
        fields["controlnets"] = [_unit(u) for u in call.positive.controls]
    if call.model.ip_adapters:  # IPAdapter nodes on the MODEL: the request's ip_adapters, in order
        fields["ip_adapters"] = [
            IPAdapterRef(u.adapter, u.image, u.weight, u.start, u.end) for u in call.model.ip_adapters
        ]
    return fields


def _unit(unit: ControlUnit) -> ControlNetRef:
    """A ControlNet node's unit as our request's (the image resized to the sampled size, centred)."""
    image = GatedImage(image_to_pil(unit.image[0]), "controlnets.image")
    crop = "crop_and_resize"
    return ControlNetRef(
        unit.net, image, unit.strength, unit.start, unit.end, resize_mode=crop, control_type=unit.control_type
    )


def _latent_input(call: SampleCall, samples: Tensor | None) -> LatentInput | None:
    """The request's latent start: the latents, no added noise, the window (None: none of them)."""
    w, latent = call.window, call.latent
    if samples is None and call.noisy and w is None:
        return None  # a plain request (same fields as /sample's)
    start, end, leftover = (w.start, w.end, w.leftover_noise) if w is not None else (0, None, False)
    mask = latent.noise_mask if samples is not None else None
    return LatentInput(samples, call.noisy, start, end, leftover, mask)


def requests_for(call: SampleCall, model: LoadedModel) -> list[GenerationRequest]:
    """The call as our requests: one for a batch from noise or from latents, one per image for an
    img2img start from pixels (each its own init image; they still share model calls)."""
    common = {"model": model.name, **_names(call, model), **_conditioning(call, model)}
    latent, denoise = call.latent, call.sigmas.denoise
    seeds = seeds_for(call.seed or 0, latent.batch, latent.batch_index)
    if latent.samples is not None:
        start = _latent_input(call, latent.samples)
        fields = dict(common, n=latent.batch, seed=seeds, latent=start)
        if denoise < 1.0:
            fields["denoise"] = denoise
        return [GenerationRequest(**fields)]
    if latent.images is None:
        if denoise < 1.0:
            raise InputError(
                "denoise",
                "denoise < 1 needs a start image (VAEEncode or a sampler's LATENT); this latent is empty",
                [1.0],
            )
        return [GenerationRequest(**common, n=latent.batch, seed=seeds, latent=_latent_input(call, None))]
    out = []
    for i in range(latent.batch):
        fields = dict(common, n=1, seed=[seeds[i]], denoise=denoise, latent=_latent_input(call, None))
        fields["init_image"] = GatedImage(image_to_pil(latent.images[i]), "init_image")
        if latent.noise_mask is not None:
            mask = latent.noise_mask[min(i, latent.noise_mask.shape[0] - 1)]
            fields["mask"] = GatedImage(mask_to_pil(mask), "mask")
        out.append(GenerationRequest(**fields))
    return out


async def sample(call: SampleCall, rt: NodeRun) -> Latent:
    """Run the call's requests through the service and wait; the result as a LATENT (its images)."""
    service = rt.service
    name = service.pool.resolve(call.model.name)
    if name is None:
        raise InputError("model", f"unknown model {call.model.name!r}", service.pool.known())
    async with service.pool.using(name) as model:
        requests = requests_for(call, model)
        flow = bool(getattr(model.denoiser, "flow", False))
    jobs: list[Job] = []
    drivers = []  # each job's driver keeps its final latents after the engine is done with it
    try:
        for request in requests:
            jobs.append(await service.generate(request, rt.ctx.owner))
            drivers.append(jobs[-1].request.driver)
        await _wait(jobs, rt)
    except BaseException as exc:
        running = [j for j in jobs if not j.status.finished]
        for job in running:
            service.cancel(job)
        if running and not isinstance(exc, asyncio.CancelledError):  # interrupted: ended when we say so
            await asyncio.wait([asyncio.ensure_future(j.wait_done()) for j in running], timeout=CANCEL_WAIT_S)
        raise
    images = torch.cat([png_to_image(png) for job in jobs for png in job.result.pngs])
    samples = await asyncio.to_thread(_final_latents, drivers, flow)
    b, h, w, _ = images.shape
    latent = call.latent
    return Latent(w, h, b, images, latent.noise_mask, name, samples, latent.batch_index)


def _final_latents(drivers: list[Any], flow: bool) -> Tensor | None:
    """The jobs' sampled latents on the CPU (a flow model's leftover noise: ComfyUI's x / (1 - t));
    None when a job ran elsewhere (no driver here): the LATENT is then its decoded images."""
    if any(d is None for d in drivers):
        return None
    parts = []
    for driver in drivers:
        x = driver.result().detach().float().cpu()
        t = float(driver.sigmas[-1])
        parts.append(x / (1.0 - t) if flow and 0.0 < t < 1.0 else x)
    return torch.cat(parts)


async def _wait(jobs: list[Job], rt: NodeRun) -> None:
    """Wait for the jobs, reporting ComfyUI progress (steps) and previews; cancel on interrupt."""
    last = -1
    while True:
        events = [j.change_event() for j in jobs]
        if all(j.status.finished for j in jobs):
            break
        rt.check_cancelled()
        value = sum(j.progress.step for j in jobs)
        if value != last:
            last = value
            total = sum(max(j.progress.total, 1) for j in jobs)
            rt.emit("progress", {"value": value, "max": total, "node": rt.node_id})
            await _preview(jobs, rt)
        waits = [asyncio.ensure_future(e.wait()) for e in events]
        try:
            await asyncio.wait(waits, timeout=POLL_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
    for job in jobs:
        if job.status != JobStatus.succeeded:
            if job.status == JobStatus.cancelled:
                raise Interrupted()
            why = job.error.message if job.error is not None else job.status.value
            raise RuntimeError(f"sampling failed: {why}")


async def _preview(jobs: list[Job], rt: NodeRun) -> None:
    if not getattr(rt.ctx, "previews", False):
        return
    running = next((j for j in jobs if not j.status.finished), None)
    if running is None:
        return
    png = await rt.service.preview_png(running, PREVIEW_SIDE)
    if png is not None:
        rt.ctx.on_event("b_preview", base64.b64decode(png))


def latent_images(latent: Latent) -> Tensor:
    """A LATENT's images for VAEDecode (a sampler's result or VAEEncode's pixels)."""
    if latent.images is None:
        raise InputError(
            "samples", "VAEDecode of an empty latent: sample it first (KSampler) or encode an image", []
        )
    return latent.images


async def decode_latents(rt: NodeRun, model_name: str, samples: Tensor) -> Tensor:
    """A model's latents -> IMAGE, by its VAE in a thread, rounded to 8 bits as the engine's PNGs."""
    async with rt.service.pool.using(model_name) as model:
        return await asyncio.to_thread(_decode, model, samples)


def _decode(model: LoadedModel, samples: Tensor) -> Tensor:
    with torch.inference_mode():
        x = samples.to(model.device)
        images = (model.decode(x) if model.decode is not None else x).float().cpu()
    return torch.cat([pil_to_image(to_pil(i)) for i in images])

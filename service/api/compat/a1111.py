"""A1111 routes that generate or act on the caller's work: txt2img, img2img, progress, interrupt,
skip, options, png-info. Each request is translated into our SampleRequests and runs through the
same engine as POST /sample (so requests of every frontend share model calls)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Body, Depends, Query

from service import image_gate, infotext
from service.engine import JobStatus
from service.image_gate import ImageInputError
from service.images import KDIFF_KEY, PARAMETERS_KEY
from service.sampling.errors import InputError
from service.serving.hires import model_names
from service.serving.service import Service

from ..deps import require_api_key
from . import a1111_encode, a1111_options, a1111_results, a1111_translate, limits
from .a1111_schemas import (
    ImageResponse,
    Img2ImgRequest,
    PNGInfoRequest,
    PNGInfoResponse,
    ProgressResponse,
    ProgressState,
    Txt2ImgRequest,
)
from .caller import CompatCall, compat_call, compat_caller
from .errors import A1111Route
from .runner import run

router = APIRouter(
    prefix="/sdapi/v1", tags=["a1111"], dependencies=[Depends(require_api_key)], route_class=A1111Route
)


def _check_free_fields(body: Txt2ImgRequest) -> None:
    """What we ignore or echo is bounded too (limits.py); known override_settings are typed."""
    a1111_options.check_overrides(body.override_settings or {})
    for name, value in {**(body.model_extra or {}), "alwayson_scripts": body.alwayson_scripts}.items():
        limits.check_depth(value, name)


async def _generate(body: Txt2ImgRequest, call: CompatCall) -> dict[str, Any]:
    _check_free_fields(body)
    options = call.options()
    state = call.state
    async with call.model(
        a1111_translate.checkpoint(body, options, call.default_model, state.pool.known())
    ) as m:
        upscalers = model_names(getattr(state.pool, "upscalers", None))  # a hires fix may name one
        plan = await asyncio.to_thread(
            a1111_translate.plan, body, m, options, state.settings.max_images, upscalers
        )
    overrides = body.override_settings or {}
    if overrides and not body.override_settings_restore_afterwards:
        # A1111 leaves the overrides set (the model under the name it resolved), before it runs
        kept = overrides | ({"sd_model_checkpoint": m.name} if "sd_model_checkpoint" in overrides else {})
        call.compat.options.update(call.caller.options_scope, kept)
        options = call.options()
    jobs = await run(call, plan.bodies)
    encoding = a1111_encode.encoding(options)  # after a restore: the caller's options (A1111 encodes then)
    return await asyncio.to_thread(a1111_results.render, plan, body, jobs, encoding)


@router.post("/txt2img", response_model=ImageResponse)
async def txt2img(body: Txt2ImgRequest, call: CompatCall = Depends(compat_call)) -> dict[str, Any]:
    """A1111's txt2img: batch_size images per batch, n_iter batches (all queued at once)."""
    return await _generate(body, call)


@router.post("/img2img", response_model=ImageResponse)
async def img2img(body: Img2ImgRequest, call: CompatCall = Depends(compat_call)) -> dict[str, Any]:
    """A1111's img2img and inpainting (mask: white = repaint; inpainting_mask_invert flips it)."""
    return await _generate(body, call)


@router.get("/progress", response_model=ProgressResponse)
async def progress(
    skip_current_image: bool = Query(False), call: CompatCall = Depends(compat_caller)
) -> ProgressResponse:
    """Progress of the caller's own unfinished requests (never another client's): as A1111, over all
    the batches of each request, those already done (or skipped) counted whole."""
    state = call.state
    jobs = [j for group in call.compat.running_requests(call.caller) for j in group]
    if not jobs:
        return ProgressResponse(progress=0.0, eta_relative=0.0, state=ProgressState(), current_image=None)
    unfinished = [j for j in jobs if not j.status.finished]
    running = [j for j in unfinished if j.status == JobStatus.running]
    current = running[0] if running else unfinished[0]
    expected = sum(max(1, j.progress.expected_evals) for j in jobs)
    evals = sum(max(1, j.progress.expected_evals) if j.status.finished else j.progress.evals for j in jobs)
    etas = [j.eta_s() for j in running]
    eta = max((e for e in etas if e is not None), default=0.0)
    image = None if skip_current_image else await state.preview_png(current, 256)
    # A1111 counts each pass of a batch as a job (hires fix: job_count doubles, job_no moves on
    # and sampling_step restarts for the second pass)
    cp = current.progress
    passes = [j.progress.passes for j in jobs]
    index = jobs.index(current)
    st = ProgressState(
        job=f"Batch {index + 1} out of {len(jobs)}",
        job_count=sum(passes),
        job_no=sum(passes[:index]) + cp.pass_no,
        job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(current.created)),
        sampling_step=cp.pass_step,
        sampling_steps=cp.pass_steps,
    )
    return ProgressResponse(
        progress=round(min(1.0, evals / expected), 4), eta_relative=eta, state=st, current_image=image
    )


@router.post("/interrupt")
async def interrupt(call: CompatCall = Depends(compat_caller)) -> None:
    """Stop the caller's unfinished jobs: as A1111, its request returns the images as they stand (a
    running job's latest denoised prediction of each image) with ``interrupted: true``."""
    for job in call.active():
        job.keep_partial = True
        call.state.cancel(job)


@router.post("/skip")
async def skip(call: CompatCall = Depends(compat_caller)) -> None:
    """Stop the caller's current batch only (the running job, else the next queued one); as A1111,
    a running batch's images come back as they stand."""
    jobs = call.active()
    running = [j for j in jobs if j.status == JobStatus.running] or jobs[:1]
    for job in running[:1]:
        job.keep_partial = True
        call.state.cancel(job)


def _defaults(state: Service) -> dict[str, Any]:
    return {
        "sd_model_checkpoint": state.pool.default_model,
        "sd_checkpoint_hash": None,
        "sd_vae": "Automatic",
        "CLIP_stop_at_last_layers": 1,
        **a1111_encode.DEFAULTS,
        "initial_noise_multiplier": 1.0,
        "eta_noise_seed_delta": 0,
        "sd_checkpoints_limit": len(state.pool.models),
    }


@router.get("/options")
async def get_options(call: CompatCall = Depends(compat_caller)) -> dict[str, Any]:
    """The caller's options (per API key; per server without one) over the defaults."""
    return {**_defaults(call.state), **call.options()}


@router.post("/options")
async def set_options(body: dict[str, Any] = Body(...), call: CompatCall = Depends(compat_caller)) -> None:
    """Set the caller's options (typed where we read them, the rest bounded: a1111_options).
    sd_model_checkpoint picks the model the caller's A1111 requests use (ours are per request: one
    not loaded yet loads on the first of them, nothing is unloaded); CLIP_stop_at_last_layers its
    clip skip."""
    if body.get("sd_model_checkpoint") is not None:
        wanted = a1111_options.check_known("sd_model_checkpoint", body["sd_model_checkpoint"])
        body["sd_model_checkpoint"] = a1111_translate.model_name(wanted, call.state.pool.known())
    call.compat.options.update(call.caller.options_scope, body)


@router.post("/png-info", response_model=PNGInfoResponse)
async def png_info(body: PNGInfoRequest) -> PNGInfoResponse:
    """The infotext of a PNG (ours or A1111's; JPEG / WebP: EXIF UserComment), parsed; other text
    chunks (our JSON: ``kdiff``) in items. Read through the image gate, no pixel decoded, off the loop."""
    return await asyncio.to_thread(_png_info, body.image)


def _png_info(data: str) -> PNGInfoResponse:
    try:
        chunks = image_gate.text_chunks(data, "image")
    except ImageInputError as exc:
        raise InputError(exc.field, exc.message, exc.allowed) from exc
    text = chunks.pop(PARAMETERS_KEY, "")
    if text.startswith("{") and KDIFF_KEY not in chunks:  # our older PNGs: JSON in "parameters"
        chunks[KDIFF_KEY], text = text, ""
    try:
        parameters = infotext.parse(text) if text else {}
    except infotext.InfotextTooLong as exc:
        raise InputError("image", f"image: its parameters text is too long to parse ({exc})") from exc
    return PNGInfoResponse(info=text, items=chunks, parameters=parameters)

"""Finished jobs -> A1111's response: images (resized to the asked size, in the caller's
``samples_format``: PNG with A1111's infotext in the ``parameters`` chunk and our JSON in its own,
JPEG / WebP with the infotext in EXIF; a1111_encode.py), ``parameters`` (the request) and ``info``."""

from __future__ import annotations

import base64
import io
import json
import time
from typing import Any

from PIL import Image

from service import a1111_names, infotext
from service.engine import Job, JobStatus

from .a1111_encode import Encoding, encode
from .a1111_schemas import Img2ImgRequest, Txt2ImgRequest
from .a1111_translate import Plan

PNG = Encoding()


def _image_params(plan: Plan, body: Txt2ImgRequest, params: dict[str, Any], index: int) -> dict[str, Any]:
    p = {k: v for k, v in params.items() if k != "seeds"}
    extra = _extra(plan)
    return {
        **p,
        "seed": params["seeds"][index],
        "index": index,
        "a1111_prompt": body.prompt,
        "a1111_negative_prompt": body.negative_prompt or None,
        "a1111_extra": extra,
        "width": plan.size[0],
        "height": plan.size[1],
    }


def _extra(plan: Plan) -> dict[str, Any]:
    """A1111's extra infotext fields: the hires fix's, img2img's noise multiplier when not 1, and a
    fixed-size model's resize."""
    extra = dict(plan.hires.extra) if plan.hires is not None else {}
    multiplier = plan.bodies[0].noise_multiplier if plan.bodies else None
    if multiplier is not None and multiplier != 1.0:
        extra["Noise multiplier"] = multiplier
    if plan.generated != plan.size and (plan.hires is None or plan.hires.fields is None):
        extra["Resized from"] = f"{plan.generated[0]}x{plan.generated[1]}"
    return extra


def _reencode(
    png: bytes,
    size: tuple[int, int],
    params: dict[str, Any],
    text: str,
    overlay: tuple[Image.Image, Image.Image] | None = None,
    enc: Encoding = PNG,
) -> bytes:
    img: Image.Image = Image.open(io.BytesIO(png))
    img.load()
    if img.size != size:
        img = img.resize(size, Image.Resampling.LANCZOS)
    if overlay is not None:
        original, mask = overlay
        img = Image.composite(img, original.convert(img.mode), mask)
    ours = {k: v for k, v in params.items() if not k.startswith("a1111_")}
    return encode(img, ours, text, enc)


def overlay_at(
    overlay: tuple[Image.Image, Image.Image] | None, size: tuple[int, int]
) -> tuple[Image.Image, Image.Image] | None:
    """A1111's inpainting overlay (processing.apply_overlay of mask_for_overlay) at the results' size,
    made once per response: the init image goes over each result where the (blurred) mask is black,
    so what was not masked comes back as sent rather than through the VAE or the sampler's blend."""
    if overlay is None:
        return None
    init, mask = overlay
    if init.size != size:
        init = init.resize(size, Image.Resampling.LANCZOS)
    mask = mask.convert("L")
    if mask.size != size:
        mask = mask.resize(size, Image.Resampling.BILINEAR)
    return init, mask


def render(plan: Plan, body: Txt2ImgRequest, jobs: list[Job], enc: Encoding = PNG) -> dict[str, Any]:
    """Runs in a thread: the response body of an A1111 txt2img / img2img request, its images
    encoded as ``enc`` (a1111_encode: the caller's samples_format)."""
    images: list[str] = []
    infotexts: list[str] = []
    seeds: list[int] = []
    overlay = overlay_at(plan.overlay, plan.out_size) if body.send_images else None
    for job in jobs:
        if job.result is None:  # failed, or cancelled before it started; interrupted jobs have images
            continue
        result = job.result
        params = {**result.parameters, "seeds": result.seeds}
        for i, png in enumerate(result.pngs):
            p = _image_params(plan, body, params, i)
            text = infotext.from_parameters(p)
            infotexts.append(text)
            seeds.append(p["seed"])
            if body.send_images:
                png = _reencode(png, plan.out_size, p, text, overlay, enc)
                images.append(base64.b64encode(png).decode())
    interrupted = any(j.status == JobStatus.cancelled for j in jobs)
    echo = body.model_dump()
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:  # A1111 echoes them on request
        echo["init_images"], echo["mask"] = None, None
    return {
        "images": images,
        "parameters": echo,
        "info": json.dumps(info(plan, body, seeds, infotexts, interrupted)),
    }


def info(
    plan: Plan, body: Txt2ImgRequest, seeds: list[int], infotexts: list[str], interrupted: bool
) -> dict[str, Any]:
    n = len(seeds)
    strength = body.subseed_strength
    subseeds = [plan.subseeds[plan.seeds.index(s)] for s in seeds] if seeds else []
    hires = plan.hires is not None
    denoise = body.denoising_strength if isinstance(body, Img2ImgRequest) or hires else None
    return {
        "prompt": body.prompt,
        "all_prompts": [body.prompt] * n,
        "negative_prompt": body.negative_prompt,
        "all_negative_prompts": [body.negative_prompt] * n,
        "seed": seeds[0] if seeds else plan.seeds[0],
        "all_seeds": seeds,
        "subseed": subseeds[0] if subseeds else plan.subseeds[0],
        "all_subseeds": subseeds,
        "subseed_strength": strength,
        "width": plan.size[0],
        "height": plan.size[1],
        "sampler_name": a1111_names.sampler_display(plan.sampler),
        "scheduler": a1111_names.schedule_label(plan.schedule),
        "cfg_scale": plan.cfg_scale,
        "steps": plan.steps,
        "batch_size": body.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": plan.model.name,
        "sd_model_hash": None,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": denoise,
        "extra_generation_params": _extra(plan),
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": body.styles or [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": plan.clip_skip,
        "is_using_inpainting_conditioning": bool(plan.model.info.get("inpainting", False)),
        "version": infotext.VERSION,
        "interrupted": interrupted,
        "comments": plan.comments,
        "model_generated_size": f"{plan.generated[0]}x{plan.generated[1]}",
    }

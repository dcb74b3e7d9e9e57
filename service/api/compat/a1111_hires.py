"""A1111's hires fix fields (``enable_hr``, ``hr_scale``, ``hr_resize_x/y``, ``hr_upscaler``,
``hr_second_pass_steps``, ``denoising_strength``, ``hr_sampler_name``, ``hr_scheduler``,
``hr_prompt``, ``hr_negative_prompt``) -> our request's ``hires`` object (serving/hires.py runs it),
the size A1111's result has, and its infotext fields."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from service import a1111_names
from service.models.store import LoadedModel
from service.sampling.errors import InputError
from service.serving.hires import DEFAULT_DENOISE, HiresFix, check_upscaler, target_size

from . import frontend_schedules
from .a1111_schemas import Txt2ImgRequest

SAME = ("", "use same sampler", "use same scheduler")  # A1111's UI choices for "the first pass's"


@dataclass
class Hires:
    """What a txt2img body's hires fix becomes: ``fields`` (our ``hires`` object; None for a model
    of one size, whose image is resized instead) and the result's ``size`` (width, height)."""

    fields: dict[str, Any] | None
    size: tuple[int, int]
    extra: dict[str, Any] = field(default_factory=dict)  # A1111's "Hires ..." infotext fields


def _same(name: str | None) -> bool:
    return name is None or name.strip().lower() in SAME


def _size_field(body: Txt2ImgRequest) -> str:
    return "hr_resize_x" if body.hr_resize_x or body.hr_resize_y else "hr_scale"


def plan_hires(
    body: Txt2ImgRequest, model: LoadedModel, steps: int, comments: list[str], upscalers: Collection[str] = ()
) -> Hires:
    """Check a body's hires fields (naming A1111's) for ``model`` and translate them
    (``upscalers``: the upscaler models' names)."""
    upscaler = check_upscaler(body.hr_upscaler, "hr_upscaler", upscalers)
    scale = 2.0 if body.hr_scale is None else body.hr_scale
    hr = HiresFix(scale=scale, resize_x=body.hr_resize_x or 0, resize_y=body.hr_resize_y or 0)
    where = _size_field(body)
    final = target_size(hr, body.width, body.height, 8, where).final
    limit = model.size_limit()
    if max(final) > limit:
        raise InputError(
            where,
            f"the hires size {final[0]}x{final[1]} is over this model's limit of {limit} a side",
            [8, limit],
        )
    denoise = DEFAULT_DENOISE if body.denoising_strength is None else body.denoising_strength
    if denoise <= 0:
        raise InputError("denoising_strength", "hires fix needs denoising_strength > 0", [0.0, 1.0])
    extra = _infotext(body, upscaler, scale, denoise)
    _check_checkpoint(body.hr_checkpoint_name, model)
    if model.fixed_size:
        comments.append(f"model {model.name!r} makes one size: hires fix not run; the image is resized")
        return Hires(None, final, extra)
    fields: dict[str, Any] = {"upscaler": upscaler, "denoise": denoise}
    if body.hr_resize_x or body.hr_resize_y:
        fields |= {"resize_x": body.hr_resize_x or 0, "resize_y": body.hr_resize_y or 0}
    else:
        fields["scale"] = scale
    if body.hr_second_pass_steps:
        fields["steps"] = body.hr_second_pass_steps
    fields |= _sampler(body, model, body.hr_second_pass_steps or steps, denoise, comments)
    if body.hr_prompt:
        fields["prompt"] = body.hr_prompt
    if body.hr_negative_prompt:
        fields["negative_prompt"] = body.hr_negative_prompt
    return Hires(fields, final, extra)


def _check_checkpoint(name: str | None, model: LoadedModel) -> None:
    """A1111's ``hr_checkpoint_name`` (processing.py: a checkpoint other than "Use same checkpoint"
    loaded for the second pass). The second pass continues in the first pass's job, on its model, so
    only that model is accepted (under any of A1111's spellings of its title); another is a 422."""
    if name is None or name.strip().lower() in ("", "use same checkpoint"):
        return
    from .a1111_translate import model_name  # A1111's title spellings; imported here: it imports us

    try:
        same = model_name(name, [model.name]) == model.name
    except InputError:
        same = False
    if not same:
        raise InputError(
            "hr_checkpoint_name",
            f"a second-pass checkpoint other than the request's model ({model.name!r}) is not "
            f"supported; got {name!r}. Send 'Use same checkpoint' (or leave it empty) or {model.name!r}",
            ["Use same checkpoint", model.name],
        )


def _sampler(
    body: Txt2ImgRequest, model: LoadedModel, steps: int, denoise: float, comments: list[str]
) -> dict[str, Any]:
    """The second pass's sampler and schedule where the body names its own."""
    sampler_name = None if _same(body.hr_sampler_name) else body.hr_sampler_name
    scheduler = None if _same(body.hr_scheduler) else body.hr_scheduler
    try:
        sampler, schedule = a1111_names.resolve(sampler_name, scheduler)
    except InputError as exc:
        name = "hr_sampler_name" if exc.field == "sampler_name" else "hr_scheduler"
        raise InputError(name, exc.message.replace(exc.field, name), exc.allowed) from exc
    out: dict[str, Any] = {}
    if sampler is not None:
        out["sampler"] = sampler
    if schedule is not None:
        schedule, options, note = frontend_schedules.for_model(schedule, model, steps, denoise)
        if options:  # only continuous-time models need options, and those make one size
            schedule = str(model.manifest.defaults.get("schedule", "karras"))
        comments += [f"hires: {note}"] if note else []
        out["schedule"] = schedule
    return out


def _infotext(body: Txt2ImgRequest, upscaler: str, scale: float, denoise: float) -> dict[str, Any]:
    """A1111's hires infotext fields, in its order (processing.py: calculate_target_resolution, init)."""
    out: dict[str, Any] = {"Denoising strength": denoise}
    if body.hr_resize_x or body.hr_resize_y:
        out["Hires resize"] = f"{body.hr_resize_x or 0}x{body.hr_resize_y or 0}"
    else:
        out["Hires upscale"] = scale
    if body.hr_second_pass_steps:
        out["Hires steps"] = body.hr_second_pass_steps
    out["Hires upscaler"] = upscaler
    if not _same(body.hr_sampler_name) and body.hr_sampler_name != body.sampler_name:
        out["Hires sampler"] = body.hr_sampler_name
    if not _same(body.hr_scheduler) and body.hr_scheduler != body.scheduler:
        out["Hires schedule type"] = body.hr_scheduler
    if body.hr_prompt and body.hr_prompt != body.prompt:
        out["Hires prompt"] = body.hr_prompt
    if body.hr_negative_prompt and body.hr_negative_prompt != body.negative_prompt:
        out["Hires negative prompt"] = body.hr_negative_prompt
    return out

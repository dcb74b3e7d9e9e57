"""A1111's scripts on txt2img / img2img (``modules/api/api.py``: ``script_name``, ``alwayson_scripts``)
and its refiner (``refiner_checkpoint``, ``refiner_switch_at``), checked before anything runs.

A1111 answers 422 for a ``script_name`` it does not have (``script_name_to_index``) and for an
``alwayson_scripts`` title it does not have ("always on script ... not found"); titles match
case-insensitively. Here no selectable script runs (x/y/z plot, prompt matrix, prompts from file,
loopback, SD upscale, outpainting): any ``script_name`` but ``""`` / ``"None"`` is a 422 naming it,
where silently running the plain request would hand back something else than asked. Always-on
scripts: ``controlnet`` runs (a1111_controlnet.py); A1111's own built-in ones are accepted as its
API accepts them (``Refiner``, ``Seed``, ``Sampler``: set up for the UI only, so their args do
nothing over the API; ``Comments``, ``Extra options``, ``Hypertile``, ``Soft Inpainting``: not run
here, said in ``comments`` when given args); any other title (an extension this service does not
have: ADetailer, animatediff, reactor, ...) is a 422 naming it.

A refiner switches to another checkpoint part way through sampling; a job here runs on one model,
so ``refiner_checkpoint`` naming another model is a 422 (the request's own model, ``""`` or
``"None"``: no switch, accepted).
"""

from __future__ import annotations

from typing import Any

from service.models.store import LoadedModel
from service.sampling.errors import InputError

from .a1111_schemas import Txt2ImgRequest

RUN = ("controlnet",)  # always-on scripts this service runs
UI_ONLY = ("refiner", "seed", "sampler")  # A1111's builtin UI scripts: their setup is skipped over the API
NOT_RUN = ("comments", "extra options", "hypertile", "soft inpainting")  # A1111 builtins not run here
NO_SCRIPT = ("", "none")


def check(body: Txt2ImgRequest, model: LoadedModel, comments: list[str]) -> None:
    """A 422 for a script or refiner the body asks for that does not run here; notes in ``comments``."""
    name = body.script_name
    if name is not None and name.strip().lower() not in NO_SCRIPT:
        raise InputError(
            "script_name",
            f"script {name!r} is not available here: no A1111 scripts run (x/y/z plot, prompt matrix, "
            "prompts from file, ...); send the requests it would make one by one, or omit script_name",
            [],
        )
    for title, script in (body.alwayson_scripts or {}).items():
        key = str(title).strip().lower()
        if key in RUN or key in UI_ONLY:
            continue
        if key in NOT_RUN:
            if isinstance(script, dict) and script.get("args"):
                comments.append(f"always-on script {title!r} does not run here; its args are ignored")
            continue
        allowed = [*RUN, *UI_ONLY, *NOT_RUN]
        raise InputError(
            f"alwayson_scripts.{title}",
            f"always on script {title!r} not found; this service has: {', '.join(allowed)}",
            allowed,
        )
    _check_refiner(body, model)


def _check_refiner(body: Txt2ImgRequest, model: LoadedModel) -> None:
    name: Any = (body.model_extra or {}).get("refiner_checkpoint")
    if name is None or (isinstance(name, str) and name.strip().lower() in NO_SCRIPT):
        return
    from .a1111_translate import model_name  # A1111's title spellings; imported here: it imports us

    try:
        same = isinstance(name, str) and model_name(name, [model.name]) == model.name
    except InputError:
        same = False
    if not same:
        raise InputError(
            "refiner_checkpoint",
            f"a refiner (switching to another checkpoint part way through sampling) is not supported; "
            f"got {name!r}. Omit refiner_checkpoint, or run the other model as img2img on the result",
            ["", "None", model.name],
        )

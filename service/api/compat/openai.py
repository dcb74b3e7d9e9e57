"""OpenAI Images API: POST /v1/images/generations, POST /v1/images/edits and /v1/images/variations
(multipart), GET /v1/models, and the short-lived image URLs of ``response_format: "url"``. Requests
run through the engine as POST /sample's do; errors come in OpenAI's shape. ``stream: true`` answers
with OpenAI's image events (text/event-stream) instead of the JSON body."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import time
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from PIL import Image
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from service import image_gate
from service.engine import Job, JobStatus
from service.images import png_bytes, read_parameters
from service.serving.service import Service

from ..deps import get_state, require_api_key
from ..guard import owner_of
from . import openai_edit_json, openai_stream
from . import openai_output as output
from .caller import CompatCall, compat_call
from .errors import OpenAIError, OpenAIRoute
from .image_links import ImageLinks
from .openai_schemas import (
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    ModelList,
    ModelObject,
    form_fields,
)
from .openai_translate import OPENAI_MODELS, Translated, model_for, translate
from .runner import run

router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)
authed = [Depends(require_api_key)]
MAX_UPLOAD = image_gate.MAX_FILE_BYTES
STARTED = int(time.time())
# The OpenAPI schema's second body of the image routes: OpenAI's events, with ``stream: true``.
STREAMED: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {}}}}


def links(request: Request) -> ImageLinks:
    app_state = request.app.state
    if not hasattr(app_state, "image_links"):
        app_state.image_links = ImageLinks()
    return app_state.image_links  # type: ignore[no-any-return]


def _resized(png: bytes, size: tuple[int, int]) -> bytes:
    img: Image.Image = Image.open(io.BytesIO(png))
    img.load()
    if img.size == size:
        return png
    params = read_parameters(png)
    params |= {"width": size[0], "height": size[1]}
    return png_bytes(img.resize(size, Image.Resampling.LANCZOS), params)


def _pngs(t: Translated, jobs: list[Job]) -> list[bytes]:
    out = []
    for job in jobs:
        if job.status == JobStatus.cancelled:
            raise OpenAIError(409, "the request was cancelled", None, "cancelled")
        out += [_resized(p, t.size) for p in job.result.pngs]
    return out


def _images(req: ImageGenerationRequest, t: Translated, jobs: list[Job]) -> list[bytes]:
    """The finished jobs' images at the response's size, in the asked ``output_format``."""
    return [output.encode(png, req) for png in _pngs(t, jobs)]


# OpenAI's GPT image models (gpt-image-*, chatgpt-image-*) always answer b64_json, and clients rely
# on it: Open WebUI sends them no response_format, then prefers a url and fetches it through an SSRF
# check that refuses loopback and LAN hosts, so a url from a local server failed its images.
GPT_IMAGE_MODELS = re.compile(r"^(gpt-image|chatgpt-image)")


def _formats(req: ImageGenerationRequest) -> tuple[str, ...]:
    """What the JSON body carries per image: the asked ``response_format``; without one, b64_json for
    a GPT image model name (as OpenAI), else both b64_json and url."""
    if req.response_format is not None:
        return (req.response_format,)
    if req.model and GPT_IMAGE_MODELS.match(req.model):
        return ("b64_json",)
    return ("b64_json", "url")


async def _respond(
    call: CompatCall, req: ImageGenerationRequest, t: Translated, kind: str
) -> ImagesResponse | StreamingResponse:
    """The images of ``t``: OpenAI's JSON body, or with ``stream`` its events named ``kind``
    (image_generation, image_edit: openai_stream.py)."""
    output.check(req, t.model.name)
    if req.stream:
        return await openai_stream.stream(call, req, t, kind, lambda jobs: _images(req, t, jobs))
    jobs = await run(call, [t.body])
    images = await asyncio.to_thread(_images, req, t, jobs)
    data = []
    request = call.request
    store = links(request)
    formats = _formats(req)
    ext = output.output_format(req)
    for image in images:
        item = ImageData()
        if "b64_json" in formats:
            item.b64_json = base64.b64encode(image).decode()
        if "url" in formats:
            token = store.put(image, owner_of(request))  # bounded per key: no key expires another's
            item.url = str(request.url_for("openai_image_file", name=f"{token}.{ext}"))
        data.append(item)
    return ImagesResponse(
        created=int(time.time()),
        data=data,
        output_format=ext,
        quality=output.quality(req),
        size=f"{t.size[0]}x{t.size[1]}",
        usage=output.NO_USAGE,
        safety_identifier=req.safety_identifier or req.user or None,
    )


@router.post(
    "/images/generations",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses=STREAMED,
    dependencies=authed,
)
async def generations(
    req: ImageGenerationRequest, call: CompatCall = Depends(compat_call)
) -> ImagesResponse | StreamingResponse:
    """OpenAI's image generation. Without ``response_format``, ``b64_json`` only for a GPT image
    model name (``gpt-image-*``, ``chatgpt-image-*``: OpenAI returns those no URL), else both
    ``b64_json`` and ``url`` (edits and variations too); with ``stream: true``, OpenAI's
    ``image_generation.completed`` events (text/event-stream)."""
    async with call.model(model_for(req.model, call.state.pool.known(), call.default_model)) as model:
        t = translate(req, model, call.state.settings.max_steps)
    return await _respond(call, req, t, "image_generation")


async def _file(form: Any, names: tuple[str, ...], required: bool) -> bytes | None:
    for name in names:
        # several images (image[] repeated, as the openai client sends a list): OpenAI edits the
        # first, and the mask applies to it; form.get would give the last
        value = next((v for v in form.getlist(name) if isinstance(v, UploadFile)), None)
        if value is not None:
            data = await value.read(MAX_UPLOAD + 1)
            if len(data) > MAX_UPLOAD:
                raise OpenAIError(400, f"{name}: larger than {MAX_UPLOAD} bytes", name, "image_too_large")
            return data
    if required:
        raise OpenAIError(
            400, f"'{names[0]}' is required (a multipart file)", names[0], "missing_required_parameter"
        )
    return None


# Edits (and variations) read a form; starlette parses these two (a urlencoded one has no file, and
# is answered that the image is missing).
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


async def _form(call: CompatCall, route: str) -> Any:
    """The request's form. Another body (JSON) is refused first, naming what the route takes: read
    as a form it would be empty, and its fields would be reported missing although they were sent."""
    kind = call.request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind not in FORM_TYPES:
        raise OpenAIError(
            400,
            f"{route} takes multipart/form-data (the image as a file part, the other fields as form "
            f"fields), not {kind or 'a body without Content-Type'}",
            None,
            "invalid_content_type",
        )
    try:
        return await call.request.form()
    except Exception as exc:  # a malformed multipart body, or python-multipart missing
        raise OpenAIError(
            400, f"send multipart/form-data with an image file ({exc})", "image", "invalid_request"
        ) from exc


def _form_request(form: Any, defaults: dict[str, Any] | None = None) -> ImageGenerationRequest:
    return _validated((defaults or {}) | form_fields(form))


def _validated(fields: dict[str, Any]) -> ImageGenerationRequest:
    try:
        return ImageGenerationRequest.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise OpenAIError(400, f"{param}: {first['msg']}", param, "invalid_value") from exc


@router.post(
    "/images/edits",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses=STREAMED,
    dependencies=authed,
)
async def edits(call: CompatCall = Depends(compat_call)) -> ImagesResponse | StreamingResponse:
    """OpenAI's image edit (multipart: image, mask, prompt, n, size, response_format; or JSON with
    ``images: [{"image_url": <data URL>}]``, openai_edit_json.py): img2img, or inpainting where the
    mask (or the image's alpha) is transparent. Without ``size`` (or "auto", OpenAI's default) a
    text model keeps the image's shape (its size fitted to the model's)."""
    kind = call.request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind == "application/json":
        fields, first, json_mask = await asyncio.to_thread(openai_edit_json.parse, await call.request.body())
        return await _edit(call, _validated(fields), first, json_mask)
    form = await _form(call, "/v1/images/edits")
    req = _form_request(form)
    image = await _file(form, ("image", "image[]"), True)
    return await _edit(call, req, image, await _file(form, ("mask",), False))


async def _edit(
    call: CompatCall, req: ImageGenerationRequest, image: bytes | None, mask: bytes | None
) -> ImagesResponse | StreamingResponse:
    """An edit (or variation) of ``image``, read from the form, with the route's request."""
    state = call.state
    async with call.model(model_for(req.model, state.pool.known(), call.default_model)) as model:
        t = await asyncio.to_thread(translate, req, model, state.settings.max_steps, image, mask)
    return await _respond(call, req, t, "image_edit")


# How far a variation moves from its image (the img2img strength; the request's ``denoise`` wins):
# edits' default without a mask, enough to change the picture while keeping its layout and colours.
VARIATION_DENOISE = 0.75


@router.post(
    "/images/variations",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    dependencies=authed,
)
async def variations(call: CompatCall = Depends(compat_call)) -> ImagesResponse | StreamingResponse:
    """OpenAI's image variation (multipart: image, n, size, response_format, model): the edit path
    with no prompt (a text model's empty prompt, a class-conditional model's unconditional sample)
    at ``VARIATION_DENOISE``; transparent pixels of the image are repainted, and without ``size``
    the image's shape is kept, as in an edit."""
    form = await _form(call, "/v1/images/variations")
    # OpenAI's variations take no prompt and do not stream; ours may be given one (extra_body)
    req = _form_request(form, {"prompt": ""})
    req.stream = False
    if req.denoise is None:
        req.denoise = VARIATION_DENOISE
    return await _edit(call, req, await _file(form, ("image",), True), None)


@router.get("/images/files/{name}", name="openai_image_file", response_class=Response)
async def image_file(name: str, request: Request) -> Response:
    """A generated image, for a while after its request (``<token>.<png|jpeg|webp>``: the token is
    the credential; the bytes say their type)."""
    token, _, ext = name.rpartition(".")
    image = links(request).get(token) if ext in output.MEDIA_TYPES else None
    if image is None:
        raise OpenAIError(404, "no such image (image URLs expire after 10 minutes)", None, "not_found")
    return Response(image, media_type=output.sniff(image), headers={"Cache-Control": "private, max-age=600"})


@router.get("/models", response_model=ModelList, dependencies=authed)
async def models(state: Service = Depends(get_state)) -> ModelList:
    """Every model in the store, loaded or not (one that is not loads on its first request)."""
    return ModelList(data=[ModelObject(id=name, created=STARTED) for name in state.pool.known()])


@router.get("/models/{model_id}", response_model=ModelObject, dependencies=authed)
async def model(model_id: str, state: Service = Depends(get_state)) -> ModelObject:
    """One of ours, or an OpenAI name the image routes take (dall-e-3, gpt-image-1: the default
    model), so a client that checks its configured model before using it finds it."""
    if model_id not in state.pool.known() and not OPENAI_MODELS.match(model_id):
        raise OpenAIError(404, f"The model '{model_id}' does not exist", "model", "model_not_found")
    return ModelObject(id=model_id, created=STARTED)

"""ComfyUI's HTTP routes, each also under ``/api/`` as ComfyUI serves them, with ComfyUI's shapes
(read from its public ``server.py`` / ``execution.py``). Each key sees only its own prompts, history,
files and socket events (``front.py``). The websocket is ``ws.py``."""

from __future__ import annotations

import asyncio
import json
import mimetypes
import os
import platform
import sys
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile

from service import image_gate
from service.comfy.nodes_image import split_annotated

from ..compat.limits import depth
from ..guard import Caller
from ..settings import settings_of
from .files import FileNameError, check_name, check_type
from .front import ComfyFront, QueueFull
from .images import view_variant, with_mask_alpha
from .prompts import prompt_id_of

router = APIRouter(tags=["ComfyUI"])
MAX_DEPTH = 64  # a workflow is node -> inputs -> value (a link is a list): real ones are 4 deep
MAX_IDS = 1000  # ids in one /queue or /history delete
BIG_BODY = 256 * 2**10  # bodies parsed (and workflows validated) in a worker thread past this size


def front_of(request: Request) -> ComfyFront:
    return request.app.state.comfy  # type: ignore[no-any-return]


def owner_of(request: Request) -> str | None:
    caller: Caller | None = request.scope.get("state", {}).get("caller")
    return None if caller is None else caller.key_id


def comfy_error(status: int, kind: str, message: str, details: str = "", **headers: str) -> JSONResponse:
    """ComfyUI's error body for /prompt (``{"error": {type, message, details, extra_info}, node_errors}``)."""
    error = {"type": kind, "message": message, "details": details or message, "extra_info": {}}
    return JSONResponse({"error": error, "node_errors": {}}, status_code=status, headers=headers or None)


class BodyError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


async def json_body(request: Request, empty: Any = None) -> Any:
    """The body as JSON whatever its Content-Type says: SillyTavern posts ``text/plain``, urllib's
    default is ``application/x-www-form-urlencoded``; ComfyUI reads them all as JSON. The size was
    bounded by the key gate; nesting is bounded here (a deep value parses but breaks later)."""
    raw = await request.body()
    if not raw.strip():
        if empty is not None:
            return empty
        raise BodyError("the request body is empty; expected JSON")
    # a workflow with a base64 avatar is megabytes: parse it off the event loop
    return await asyncio.to_thread(_parse, raw) if len(raw) > BIG_BODY else _parse(raw)


def _parse(raw: bytes) -> Any:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BodyError(f"the request body is not JSON: {str(exc)[:200]}") from exc
    if depth(value, MAX_DEPTH) > MAX_DEPTH:
        raise BodyError(f"the request body is nested deeper than {MAX_DEPTH} levels")
    return value


def _ids(value: Any) -> list[str]:
    if not isinstance(value, list):
        return []
    return [v for v in value[:MAX_IDS] if isinstance(v, str)]


# ---- prompts -----------------------------------------------------------------------------------


async def post_prompt(request: Request) -> Response:
    front, owner = front_of(request), owner_of(request)
    try:
        body = await json_body(request)
    except BodyError as exc:
        return comfy_error(400, "invalid_prompt", "Invalid prompt", exc.message)
    if not isinstance(body, dict) or "prompt" not in body:
        return comfy_error(400, "no_prompt", "No prompt provided", 'the body must be {"prompt": {...}}')
    client_id = body.get("client_id")
    client_id = client_id if isinstance(client_id, str) and 0 < len(client_id) <= 256 else None
    extra = body.get("extra_data")
    extra = dict(extra) if isinstance(extra, dict) else {}
    prompt_id = prompt_id_of(body)
    if prompt_id is not None and prompt_id in front.owner(owner).running:
        return comfy_error(
            400, "invalid_prompt", "Invalid prompt", f"prompt_id {prompt_id!r} is already queued"
        )
    size = len(await request.body())
    ctx = front.context(owner)
    # off the event loop: validation scans the store's LoRA / ControlNet folders and the caller's
    # uploads, and reads base64 images' headers
    validation = await asyncio.to_thread(front.comfy.validate, body["prompt"], ctx)
    if not validation.ok:
        return JSONResponse(validation.body(), status_code=400)
    try:
        run = front.submit(
            owner,
            body["prompt"],
            prompt_id,
            client_id,
            extra,
            list(validation.outputs),
            size,
        )
    except QueueFull:
        limit = front.max_prompts
        message = f"this key has {limit} prompts queued or running (KDIFF_COMFY_MAX_PROMPTS); wait for one"
        return comfy_error(429, "queue_full", "Too many prompts", message, **{"Retry-After": "1"})
    return JSONResponse(
        {"prompt_id": run.prompt_id, "number": run.entry[0], "node_errors": validation.node_errors}
    )


async def get_prompt(request: Request) -> Response:
    return JSONResponse(front_of(request).status(owner_of(request)))


async def get_queue(request: Request) -> Response:
    runs = front_of(request).owner(owner_of(request)).running.values()
    return JSONResponse({"queue_running": [r.entry for r in runs], "queue_pending": []})


async def _clear_or_delete(request: Request, drop: Callable[[str | None, list[str] | None], Any]) -> Response:
    """``{"clear": true}`` -> ``drop(owner, None)`` (all), ``{"delete": [ids]}`` -> those named."""
    try:
        body = await json_body(request, empty={})
    except BodyError as exc:
        return Response(exc.message, status_code=400)
    if isinstance(body, dict):
        if body.get("clear"):
            drop(owner_of(request), None)
        if "delete" in body:
            drop(owner_of(request), _ids(body["delete"]))
    return JSONResponse({})  # ComfyUI answers an empty 200; clients read only the status


async def post_queue(request: Request) -> Response:
    """``clear`` stops all the caller's prompts, ``delete`` those named. (Our prompts all run at once,
    so there is no waiting line to clear without stopping them.)"""
    return await _clear_or_delete(request, front_of(request).interrupt)


async def post_interrupt(request: Request) -> Response:
    """Stops the caller's running prompts; with ``{"prompt_id": id}`` only that one (ComfyUI's
    targeted interrupt), and nothing when it is not running."""
    front = front_of(request)
    try:
        body = await json_body(request, empty={})
    except BodyError:
        body = {}  # ComfyUI's frontend posts no body at all; a junk one still means "stop"
    target = body.get("prompt_id") if isinstance(body, dict) else None
    front.interrupt(owner_of(request), [target] if isinstance(target, str) else None)
    return JSONResponse({})  # ComfyUI answers an empty 200; clients read only the status


# ---- history -----------------------------------------------------------------------------------


def _int(value: str | None) -> int | None:
    """A query parameter as an integer; None when absent or not one (ComfyUI's int() answers a 500)."""
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def history_window(items: list[Any], offset: int | None, max_items: int | None) -> list[Any]:
    """ComfyUI's ``PromptQueue.get_history``: from ``offset`` (oldest first) at most ``max_items``;
    without an offset (or a negative one) the last ``max_items``, or all of them."""
    start = offset if offset is not None and offset >= 0 else -1
    if start < 0 and max_items is not None:
        start = len(items) - max_items
    start = max(start, 0)
    if max_items is None:
        return items[start:]
    # ComfyUI takes an item before it compares the count, so a window at an offset holds at least one
    return items[start : start + max(max_items, 1)]


async def get_history(request: Request) -> Response:
    history = front_of(request).owner(owner_of(request)).history
    q = request.query_params
    items = history_window(list(history.items()), _int(q.get("offset")), _int(q.get("max_items")))
    # SillyTavern polls the whole history every 100 ms, and items hold whole workflows (base64
    # avatars too): a big one is serialised off the event loop
    if front_of(request).history_bytes(items) > BIG_BODY:
        body = await asyncio.to_thread(json.dumps, dict(items))
        return Response(body, media_type="application/json")
    return JSONResponse(dict(items))


async def get_history_item(request: Request, prompt_id: str) -> Response:
    item = front_of(request).owner(owner_of(request)).history.get(prompt_id)
    return JSONResponse({} if item is None else {prompt_id: item})


async def post_history(request: Request) -> Response:
    return await _clear_or_delete(request, front_of(request).delete_history)


# ---- files -------------------------------------------------------------------------------------


async def view(request: Request) -> Response:
    """``/view?filename&subfolder&type``: one of the caller's files with an ``image/*`` type.
    A name that would leave the folder is a 400 (ComfyUI: 400 / 403), a missing one a 404."""
    q = request.query_params
    if "filename" not in q:
        return Response("filename is required", status_code=404)
    front, owner = front_of(request), owner_of(request)
    try:
        kind = check_type(q.get("type"), "output")
        data = await asyncio.to_thread(front.files.read, owner, kind, q.get("subfolder", ""), q["filename"])
    except FileNameError as exc:
        return Response(str(exc), status_code=400)
    except FileNotFoundError:
        return Response("no such file", status_code=404)
    name = os.path.basename(q["filename"])
    if q.get("preview") is not None or q.get("channel") not in (None, "rgba"):
        try:  # ComfyUI's preview=format;quality and channel=rgb|a
            variant = await asyncio.to_thread(view_variant, data, q.get("preview"), q.get("channel"))
        except (OSError, ValueError) as exc:  # not an image PIL can read
            return Response(f"cannot make that view of {name}: {exc}", status_code=400)
        if variant is not None:
            body, fmt = variant
            headers = {"Content-Disposition": f'filename="{name.replace("png", fmt)}"'}
            return Response(body, media_type=f"image/{fmt}", headers=headers)
    media = mimetypes.guess_type(q["filename"])[0] or ""
    sniffed = image_gate.sniff(data)
    if sniffed is not None:  # the bytes say what it is, whatever the name's extension says
        media = {"PNG": "image/png", "JPEG": "image/jpeg", "WebP": "image/webp"}[sniffed]
    headers = {"Content-Disposition": f'filename="{name}"'}
    return Response(data, media_type=media or "application/octet-stream", headers=headers)


def _flag(value: Any) -> bool:
    return isinstance(value, str) and value.lower() in ("true", "1")


async def upload_image(request: Request) -> Response:
    """Multipart ``image`` (+ ``type``, ``subfolder``, ``overwrite``) -> ``{name, subfolder, type}``.
    The file passes the image gate (format, size from the header, pixels) before it is stored."""
    return await _upload(request, None)


async def upload_mask(request: Request) -> Response:
    """ComfyUI's mask editor: multipart ``image`` (the mask; its alpha is the mask) and
    ``original_ref`` (JSON ``{filename, subfolder, type}``, type default "output"): stores the
    original image with its alpha replaced by the mask's, under the uploaded name."""
    front, owner = front_of(request), owner_of(request)

    def masked(form: Any, mask: bytes) -> bytes:
        try:
            ref = json.loads(str(form.get("original_ref") or ""))
            file, sub, kind = split_annotated(str(ref["filename"]))
            kind = check_type(str(ref.get("type") or "output"), "output") if kind == "input" else kind
            sub = str(ref.get("subfolder") or sub)
        except (ValueError, KeyError, TypeError, RecursionError) as exc:  # json.loads of deep nesting
            raise MaskError("original_ref must be JSON {filename, subfolder, type}") from exc
        try:
            original = front.files.read(owner, kind, sub, file)
        except FileNotFoundError as exc:
            raise MaskError(f"original_ref: no such {kind} file {file!r}") from exc
        try:
            return with_mask_alpha(original, mask)
        except (OSError, ValueError) as exc:
            raise MaskError(f"cannot put the mask on {file!r}: {exc}") from exc

    return await _upload(request, masked)


class MaskError(Exception):
    pass


async def _upload(request: Request, transform: Callable[[Any, bytes], bytes] | None) -> Response:
    front, owner = front_of(request), owner_of(request)
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        return Response("expected a multipart/form-data body with an 'image' file", status_code=400)
    try:
        form = await request.form(max_files=1, max_fields=16)
    except Exception as exc:  # malformed multipart, too many parts: the parser's own message
        return Response(f"unreadable multipart body: {str(exc)[:200]}", status_code=400)
    try:
        image = form.get("image")
        if not isinstance(image, UploadFile) or not image.filename:
            return Response("the form needs an 'image' file with a filename", status_code=400)
        name = check_name(os.path.basename(image.filename.replace("\\", "/")))
        kind = check_type(str(form.get("type") or ""), "input")
        subfolder = str(form.get("subfolder") or "")
        data = await image.read(image_gate.MAX_FILE_BYTES + 1)
        if len(data) > image_gate.MAX_FILE_BYTES:
            return Response(f"the image is larger than {image_gate.MAX_FILE_BYTES} bytes", status_code=413)
        await asyncio.to_thread(image_gate.load, data, "image")
        if transform is not None:
            data = await asyncio.to_thread(transform, form, data)
        stored = await asyncio.to_thread(
            front.files.save, owner, kind, subfolder, name, data, _flag(form.get("overwrite"))
        )
    except (FileNameError, MaskError) as exc:
        return Response(str(exc), status_code=400)
    except image_gate.ImageInputError as exc:
        return Response(exc.message, status_code=400)
    finally:
        await form.close()
    return JSONResponse({"name": stored, "subfolder": subfolder, "type": kind})


# ---- what the server has -----------------------------------------------------------------------


def _memory() -> tuple[int, int]:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        return 0, 0


def _device(name: str) -> dict[str, Any]:
    import torch

    device = torch.device(name)
    total = free = 0
    label = platform.processor() or "cpu"
    if device.type == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(device)
        label = f"{device} {torch.cuda.get_device_name(device)}"
    elif device.type == "cpu":
        total, free = _memory()
    return {
        "name": label,
        "type": device.type,
        "index": device.index,
        "vram_total": total,
        "vram_free": free,
        "torch_vram_total": total,
        "torch_vram_free": free,
    }


async def system_stats(request: Request) -> Response:
    import torch

    ram_total, ram_free = _memory()
    settings = settings_of(request.app.state.service)
    return JSONResponse(
        {
            "system": {
                "os": os.name,
                "ram_total": ram_total,
                "ram_free": ram_free,
                "comfyui_version": "kdiffusion-service",
                "python_version": sys.version,
                "pytorch_version": torch.__version__,
                "embedded_python": False,
                "argv": ["kdiff", "serve"],  # not the real command line: it may hold secrets
            },
            "devices": [_device(settings.resolve_device())],
        }
    )


async def _json_off_loop(build: Callable[[], Any]) -> Response:
    """Build a listing and encode it in a worker thread: the node specs list the model store's
    files (directory scans, adapter layouts, encoder configs), which must not stall the event loop."""
    return await asyncio.to_thread(lambda: JSONResponse(build()))


async def object_info(request: Request) -> Response:
    front = front_of(request)
    ctx = front.context(owner_of(request))
    return await _json_off_loop(lambda: front.comfy.object_info(ctx))


async def object_info_one(request: Request, node_class: str) -> Response:
    front = front_of(request)
    ctx = front.context(owner_of(request))
    return await _json_off_loop(lambda: front.comfy.object_info_one(node_class, ctx))


def _folders(request: Request) -> dict[str, list[str]]:
    """Model folder -> file names: ``Comfy.model_folders()``, with the embedding files of the store
    (the embeddings index's ComfyUI list)."""
    folders = dict(front_of(request).comfy.model_folders())
    embeddings = getattr(request.app.state.service.pool, "embeddings", None)
    if embeddings is not None:
        folders["embeddings"] = embeddings.comfy_files()
    return folders


async def model_folders(request: Request) -> Response:
    return await _json_off_loop(lambda: list(_folders(request)))


async def model_files(request: Request, folder: str) -> Response:
    files = await asyncio.to_thread(lambda: _folders(request).get(folder))
    return Response(status_code=404) if files is None else JSONResponse(files)


Handler = Callable[..., Any]  # (request, path parameters...) -> a response
ROUTES: list[tuple[str, str, Handler]] = [
    ("POST", "/prompt", post_prompt),
    ("GET", "/prompt", get_prompt),
    ("GET", "/queue", get_queue),
    ("POST", "/queue", post_queue),
    ("POST", "/interrupt", post_interrupt),
    ("GET", "/history", get_history),
    ("GET", "/history/{prompt_id}", get_history_item),
    ("POST", "/history", post_history),
    ("GET", "/view", view),
    ("POST", "/upload/image", upload_image),
    ("POST", "/upload/mask", upload_mask),
    ("GET", "/system_stats", system_stats),
    ("GET", "/object_info", object_info),
    ("GET", "/object_info/{node_class}", object_info_one),
    ("GET", "/models/{folder}", model_files),
]
# what the schema documents besides JSON (schemathesis checks responses against it)
RESPONSES: dict[str, dict[int | str, dict[str, Any]]] = {
    "/view": {200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}}},
}
for _method, _path, _handler in ROUTES:
    for _prefix in ("", "/api"):
        router.add_api_route(
            _prefix + _path,
            _handler,
            responses=RESPONSES.get(_path),
            methods=[_method],
            include_in_schema=not _prefix,
            name=f"comfy{_prefix}{_path}",
        )
# Bare GET /models is our own model list (a contract); ComfyUI's folder list is at /api/models.
router.add_api_route("/api/models", model_folders, methods=["GET"], include_in_schema=False)

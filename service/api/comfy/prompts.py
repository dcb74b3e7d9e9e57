"""Each key's ComfyUI prompts: the ones in flight and the finished ones (``/history``), and the
context a run hands the workflow executor (``service.comfy``'s ``ComfyContext``): where its images
go, where its events go, whether it was interrupted.

Unlike ComfyUI's single worker, every prompt starts at once: its sampler nodes become jobs of our
engine, which batches them with every other request. So ``/queue`` lists a key's in-flight prompts
as running, and ``/interrupt`` or ``/queue`` ``delete`` stop exactly the prompts they name.
"""

from __future__ import annotations

import asyncio
import logging
import re
import struct
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .files import ComfyFiles, FileNameError, check_name
from .sockets import Sockets, preview_frame

log = logging.getLogger(__name__)

# LoadImage's annotated names: "x.png [output]" reads the output folder (ComfyUI's annotated_filepath)
_ANNOTATED = re.compile(r"^(.*) \[(input|output|temp)\]$")


@dataclass(eq=False)
class Run:
    """One prompt in flight."""

    entry: list[Any]  # ComfyUI's queue item: [number, prompt_id, prompt, extra_data, outputs_to_execute]
    client_id: str | None
    context: RunContext
    task: asyncio.Task[None] | None = None

    @property
    def prompt_id(self) -> str:
        return str(self.entry[1])


@dataclass
class OwnerPrompts:
    """One key's prompts; ``history`` is bounded (oldest dropped first)."""

    running: OrderedDict[str, Run] = field(default_factory=OrderedDict)
    history: OrderedDict[str, dict[str, Any]] = field(default_factory=OrderedDict)
    number: int = 0

    def queue_remaining(self) -> int:
        return len(self.running)


class RunContext:
    """What the executor needs from the HTTP side for one prompt (``service.comfy.ComfyContext``)."""

    def __init__(
        self,
        owner: str | None,
        client_id: str | None,
        prompt_id: str,
        files: ComfyFiles,
        sockets: Sockets,
        previews: bool,
    ) -> None:
        self.owner, self.client_id, self.prompt_id = owner, client_id, prompt_id
        self.files, self.sockets, self._previews = files, sockets, previews
        self._cancelled = False

    @property
    def previews(self) -> bool:
        """Preview frames are rendered (a decode per step) only while someone can receive them."""
        return self._previews and self.sockets.listening(self.owner, self.client_id)

    def cancel(self) -> None:
        self._cancelled = True

    def cancelled(self) -> bool:
        return self._cancelled

    def save_image(self, png: bytes, filename_prefix: str, type: str) -> dict[str, str]:
        subfolder, prefix = split_prefix(filename_prefix, *png_size(png))
        name = self.files.save_new(self.owner, type, subfolder, prefix, png)
        return {"filename": name, "subfolder": subfolder, "type": type}

    def load_image(self, name: str, subfolder: str = "", type: str = "input") -> bytes:
        m = _ANNOTATED.match(name)
        if m:
            name, type = m.group(1), m.group(2)
        folder, _, base = name.replace("\\", "/").rpartition("/")
        subfolder = "/".join(p for p in (subfolder, folder) if p)
        return self.files.read(self.owner, type or "input", subfolder, base)

    def list_inputs(self) -> list[str]:
        return self.files.names(self.owner, "input")

    def on_event(self, kind: str, data: dict[str, Any] | bytes) -> None:
        if isinstance(data, bytes | bytearray):
            if kind == "b_preview" and self.previews:
                self.sockets.send_bytes(self.owner, self.client_id, preview_frame(bytes(data)))
            return
        self.sockets.send(self.owner, self.client_id, kind, data)


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; (0, 0) for anything else (ComfyUI's defaults)."""
    if png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR":
        width, height = struct.unpack(">II", png[16:24])
        return int(width), int(height)
    return 0, 0


def expand_prefix(prefix: str, width: int, height: int, now: time.struct_time | None = None) -> str:
    """ComfyUI's ``compute_vars`` (folder_paths.get_save_image_path): ``%width%`` / ``%height%`` of
    the image, ``%year%`` ... ``%second%`` of local time. Nothing else: ``%Node.widget%`` is the
    frontend's to expand before it sends the prompt, so ComfyUI's backend leaves it as it is too."""
    if "%" not in prefix:
        return prefix
    t = now or time.localtime()
    values = {  # ComfyUI's order (it replaces one after the other)
        "width": str(width),
        "height": str(height),
        "year": str(t.tm_year),
        "month": f"{t.tm_mon:02}",
        "day": f"{t.tm_mday:02}",
        "hour": f"{t.tm_hour:02}",
        "minute": f"{t.tm_min:02}",
        "second": f"{t.tm_sec:02}",
    }
    for name, value in values.items():
        prefix = prefix.replace(f"%{name}%", value)
    return prefix


def split_prefix(
    filename_prefix: Any, width: int = 0, height: int = 0, now: time.struct_time | None = None
) -> tuple[str, str]:
    """SaveImage's ``filename_prefix`` -> (subfolder, name prefix), its variables expanded and split
    as ComfyUI does; parts that could not be file names (``..``, control characters) are replaced
    rather than refused, since a prefix is a label, not a path a client picks a file by. Expanded
    first, then cut and checked: the values are digits, but the bound and checks see the final name."""
    text = expand_prefix(str(filename_prefix or "ComfyUI"), width, height, now)[:120]
    parts = [p for p in text.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    clean = []
    for part in parts or ["ComfyUI"]:
        part = re.sub(r"[\x00-\x1f\x7f]", "_", part)
        try:
            clean.append(check_name(part))
        except FileNameError:
            clean.append(part.replace(".", "_") or "ComfyUI")
    return "/".join(clean[:-1][:8]), clean[-1]


def history_entry(entry: list[Any], result: Any) -> dict[str, Any]:
    """ComfyUI's history item for a finished prompt."""
    outputs = dict(result.outputs)
    return {
        "prompt": entry,
        "outputs": outputs,
        "status": {
            "status_str": result.status_str,
            "completed": bool(result.completed),
            "messages": list(result.messages),
        },
        "meta": {
            node: {"node_id": node, "display_node": node, "parent_node": None, "real_node_id": node}
            for node in outputs
        },
    }


def failed_entry(entry: list[Any], exc: BaseException) -> dict[str, Any]:
    """The history item of a run whose executor raised (a bug: its run() promises not to)."""
    prompt_id = entry[1]
    error = {
        "prompt_id": prompt_id,
        "node_id": None,
        "node_type": None,
        "executed": [],
        "exception_message": f"{type(exc).__name__}: {exc}"[:2000],
        "exception_type": type(exc).__name__,
        "traceback": traceback.format_exception_only(type(exc), exc)[-1:],
        "current_inputs": {},
        "current_outputs": {},
        "timestamp": int(time.time() * 1000),
    }
    return {
        "prompt": entry,
        "outputs": {},
        "status": {"status_str": "error", "completed": False, "messages": [["execution_error", error]]},
        "meta": {},
    }


def prompt_id_of(body: dict[str, Any]) -> str | None:
    """The client's own ``prompt_id`` if it sent a usable one (newer ComfyUI accepts it)."""
    given = body.get("prompt_id")
    if isinstance(given, str) and 0 < len(given) <= 128 and given.isprintable() and "/" not in given:
        return given
    return None


def previews_wanted(extra_data: dict[str, Any]) -> bool:
    """Preview frames unless the prompt says ``preview_method: none`` (ComfyUI's values: auto,
    latent2rgb, taesd, none)."""
    return str(extra_data.get("preview_method", "auto")).lower() != "none"

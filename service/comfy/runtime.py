"""What a node sees while it runs (:class:`NodeRun`), the context the HTTP side implements
(:class:`ComfyContext`), and the IMAGE tensor <-> PNG conversions the image nodes share."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from PIL import Image, PngImagePlugin
from torch import Tensor

from service.image_gate import MAX_TEXT_CHUNK

if TYPE_CHECKING:
    from service.serving.service import Service


class ComfyContext(Protocol):
    """One prompt run's view of the HTTP side (see /work/wt/comfy-interface.md, docs/COMFYUI.md)."""

    owner: str | None
    previews: bool

    def save_image(self, png: bytes, filename_prefix: str, type: str) -> dict[str, str]: ...

    def load_image(self, name: str, subfolder: str, type: str) -> bytes: ...

    def list_inputs(self) -> list[str]: ...

    def on_event(self, kind: str, data: dict[str, Any] | bytes) -> None: ...

    def cancelled(self) -> bool: ...


class Interrupted(Exception):
    """The prompt was interrupted (``ctx.cancelled()``)."""


@dataclass
class NodeRun:
    """A running node: the service, the caller's context, where it is in which prompt."""

    service: Service
    ctx: ComfyContext
    prompt_id: str
    node_id: str
    prompt: dict[str, Any]

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        self.ctx.on_event(kind, {**data, "prompt_id": self.prompt_id})

    def check_cancelled(self) -> None:
        if self.ctx.cancelled():
            raise Interrupted()


def pil_to_image(img: Image.Image) -> Tensor:
    """A PIL image -> IMAGE [1, H, W, 3] in [0, 1] (ComfyUI's IMAGE is always RGB)."""
    rgb = img.convert("RGB")
    buf = bytearray(rgb.tobytes())
    t = torch.frombuffer(buf, dtype=torch.uint8).view(rgb.height, rgb.width, 3).float().div_(255)
    return t.unsqueeze(0)


def png_to_image(png: bytes) -> Tensor:
    """One of our own PNGs (a finished job's) -> IMAGE [1, H, W, 3]."""
    with Image.open(io.BytesIO(png)) as img:
        return pil_to_image(img)


def image_to_pil(image: Tensor) -> Image.Image:
    """IMAGE [H, W, 3] -> an 8-bit RGB PIL image (rounded as ComfyUI's SaveImage: clip(255 x))."""
    arr = (image.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().contiguous()
    return Image.fromarray(arr.numpy(), mode="RGB")


def mask_to_pil(mask: Tensor) -> Image.Image:
    """MASK [H, W] -> an 8-bit L image (white = repaint)."""
    arr = (mask.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().contiguous()
    return Image.fromarray(arr.numpy(), mode="L")


def save_png(image: Tensor, prompt: dict[str, Any] | None) -> bytes:
    """IMAGE [H, W, 3] -> PNG with the workflow in a ``prompt`` text chunk, as ComfyUI's SaveImage."""
    info = PngImagePlugin.PngInfo()
    text = json.dumps(prompt) if prompt is not None else ""
    if text and len(text) <= MAX_TEXT_CHUNK:  # a workflow carrying a base64 image stays out of the PNG
        info.add_text("prompt", text)
    buf = io.BytesIO()
    image_to_pil(image).save(buf, format="PNG", pnginfo=info, compress_level=4)
    return buf.getvalue()

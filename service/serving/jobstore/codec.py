"""A GenerationRequest as JSON text and back, every field (so fields added later persist too).

Plain values are JSON as they are; a request's own dataclasses (``LoraRef``, and those other front
ends add) are tagged with their class, which is only ever looked up inside ``service.``; an image
that passed the gate (``GatedImage``: decoded pixels) is stored losslessly, as PNG where its mode
allows, else as its compressed raw bytes, so a replay builds from the very same pixels; a tensor
(ComfyUI's latents) as its dtype, shape and compressed raw bytes.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
import io
import json
import zlib
from typing import Any

import torch
from PIL import Image

from service.image_gate import GatedImage

from ..request import GenerationRequest

TAG = "__kdiff__"  # a key no request dict carries (sampler / schedule options are checked names)
PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA"}  # modes PNG holds exactly


def encode_request(request: GenerationRequest) -> str:
    fields = {f.name: _encode(getattr(request, f.name)) for f in dataclasses.fields(request)}
    return json.dumps(fields, allow_nan=False, separators=(",", ":"))


def decode_request(text: str) -> GenerationRequest:
    data = json.loads(text)
    known = {f.name for f in dataclasses.fields(GenerationRequest)}
    unknown = set(data) - known
    if unknown:  # written by a newer version, or a field since removed: refuse rather than guess
        raise ValueError(f"stored request has fields this version does not know: {sorted(unknown)}")
    return GenerationRequest(**{k: _decode(v) for k, v in data.items()})


def _encode(value: Any) -> Any:
    if isinstance(value, GatedImage):
        return {TAG: "image", "field": value.field, **_image(value.image)}
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        raw = zlib.compress(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        dtype = str(t.dtype).removeprefix("torch.")
        return {TAG: "tensor", "dtype": dtype, "shape": list(t.shape), "data": base64.b64encode(raw).decode()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        body = {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {TAG: "dataclass", "class": f"{cls.__module__}:{cls.__qualname__}", "fields": body}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    tag = value.get(TAG)
    if tag == "image":
        return GatedImage(_pixels(value), value["field"])
    if tag == "tensor":
        dtype = getattr(torch, value["dtype"])
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"stored tensor has dtype {value['dtype']!r}")
        raw = bytearray(zlib.decompress(base64.b64decode(value["data"])))
        return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(value["shape"])
    if tag == "dataclass":
        cls = _dataclass(value["class"])
        return cls(**{k: _decode(v) for k, v in value["fields"].items()})
    return {k: _decode(v) for k, v in value.items()}


def _dataclass(path: str) -> type:
    module, _, name = path.partition(":")
    if not module.startswith("service."):
        raise ValueError(f"stored request names class {path!r} outside the service")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
        raise ValueError(f"stored request names {path!r}, which is not a dataclass")
    return obj


def _image(image: Image.Image) -> dict[str, Any]:
    if image.mode in PNG_MODES:
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=1)
        return {"png": base64.b64encode(buf.getvalue()).decode()}
    raw = zlib.compress(image.tobytes(), 1)
    return {"mode": image.mode, "size": list(image.size), "raw": base64.b64encode(raw).decode()}


def _pixels(value: dict[str, Any]) -> Image.Image:
    if "png" in value:
        image = Image.open(io.BytesIO(base64.b64decode(value["png"])))
        image.load()
        return image
    data = zlib.decompress(base64.b64decode(value["raw"]))
    return Image.frombytes(value["mode"], tuple(value["size"]), data)

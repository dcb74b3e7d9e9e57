"""Read a GGUF file (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) without a GGUF library.

Layout (little-endian): magic ``GGUF``, version (2 or 3), tensor count, metadata count (u64 each);
the metadata key/value pairs; one info per tensor (name, dims innermost first, ggml type, offset
into the data section); the data section at the next multiple of ``general.alignment`` (32).
Tensors are read into their own uint8 tensors (quantized bytes stay quantized; nothing is mapped
or decoded here). Shapes are given in torch order (outermost first); city96's converter records a
tensor it reshaped before quantizing under ``comfy.gguf.orig_shape.<name>``.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from service.models.quant.ggml import TYPES, QType, supported_names, type_name

MAGIC = b"GGUF"
MAX_DIMS = 4  # GGML_MAX_DIMS
# value type id -> struct format (the scalar ones); 8 = string, 9 = array
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


class GGUFError(ValueError):
    """A file that is not a GGUF this service reads (message names the file)."""


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order
    type_id: int
    offset: int  # from the start of the data section

    @property
    def nbytes(self) -> int:
        q = TYPES[self.type_id]
        n = 1
        for d in self.shape:
            n *= d
        return n // q.block * q.nbytes


@dataclass
class GGUFHeader:
    path: Path
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    data_start: int
    arch: str | None = field(default=None)


class _Reader:
    def __init__(self, f: BinaryIO, path: Path) -> None:
        self.f, self.path = f, path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        buf = self.f.read(size)
        if len(buf) != size:
            raise GGUFError(f"{self.path.name}: truncated GGUF header")
        return struct.unpack("<" + fmt, buf)[0]

    def string(self) -> str:
        n = self.take("Q")
        if n > 1 << 20:
            raise GGUFError(f"{self.path.name}: a {n}-byte string in the GGUF header")
        raw = self.f.read(n)
        if len(raw) != n:
            raise GGUFError(f"{self.path.name}: truncated GGUF header")
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in SCALARS:
            return self.take(SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            item, n = self.take("I"), self.take("Q")
            if n > 1 << 24:
                raise GGUFError(f"{self.path.name}: a {n}-item array in the GGUF header")
            return [self.value(item) for _ in range(n)]
        raise GGUFError(f"{self.path.name}: unknown GGUF metadata value type {vtype}")


def read_header(path: Path) -> GGUFHeader:
    """The metadata and tensor infos of ``path``; GGUFError for a file that is not GGUF v2/v3."""
    with path.open("rb") as f:
        r = _Reader(f, path)
        if f.read(4) != MAGIC:
            raise GGUFError(f"{path.name}: not a GGUF file (no GGUF magic)")
        version = r.take("I")
        if version not in (2, 3):
            raise GGUFError(f"{path.name}: GGUF version {version}; versions 2 and 3 are read")
        n_tensors, n_kv = r.take("Q"), r.take("Q")
        if n_tensors > 1 << 20 or n_kv > 1 << 20:
            raise GGUFError(f"{path.name}: implausible GGUF counts ({n_tensors} tensors)")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            meta[key] = r.value(r.take("I"))
        infos = []
        for _ in range(n_tensors):
            name, ndim = r.string(), r.take("I")
            if not 1 <= ndim <= MAX_DIMS:
                raise GGUFError(f"{path.name}: tensor {name!r} has {ndim} dims")
            dims = [r.take("Q") for _ in range(ndim)]
            infos.append(TensorInfo(name, tuple(reversed(dims)), r.take("I"), r.take("Q")))
        align = meta.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise GGUFError(f"{path.name}: general.alignment {align!r} is not a power of two")
        start = -(-f.tell() // align) * align
    size = path.stat().st_size
    for t in infos:  # before anything is allocated: a header cannot ask for more than the file holds
        end = start + t.offset + (t.nbytes if t.type_id in TYPES else 0)
        if end > size or min(t.shape) <= 0:
            raise GGUFError(f"{path.name}: tensor {t.name!r} lies outside the file (truncated or corrupt)")
    arch = meta.get("general.architecture")
    return GGUFHeader(path, meta, infos, start, arch if isinstance(arch, str) else None)


def check_types(header: GGUFHeader) -> None:
    """Refuse a file with a tensor type this service cannot dequantize, naming it and the supported ones."""
    for t in header.tensors:
        if t.type_id not in TYPES:
            raise GGUFError(
                f"{header.path.name}: tensor {t.name!r} is {type_name(t.type_id)}, a GGUF type this "
                f"service does not load; supported: {supported_names()}"
            )
        q = TYPES[t.type_id]
        if t.shape[-1] % q.block:
            raise GGUFError(
                f"{header.path.name}: tensor {t.name!r} rows of {t.shape[-1]} are not {q.name} blocks"
            )


def orig_shape(header: GGUFHeader, name: str) -> tuple[int, ...] | None:
    value = header.metadata.get(f"comfy.gguf.orig_shape.{name}")
    return tuple(int(v) for v in value) if isinstance(value, list) else None


def read_tensor(f: io.BufferedReader, header: GGUFHeader, info: TensorInfo) -> tuple[Tensor, QType]:
    """A tensor's raw bytes as uint8 [rows, row bytes] (rows: every dim but the innermost)."""
    q = TYPES[info.type_id]
    n = info.nbytes
    out = torch.empty(n, dtype=torch.uint8)
    f.seek(header.data_start + info.offset)
    if f.readinto(out.numpy().data) != n:
        raise GGUFError(f"{header.path.name}: tensor {info.name!r} is cut off (file truncated)")
    row = info.shape[-1] // q.block * q.nbytes
    return out.reshape(-1, row), q

"""A1111's "embedding images": a textual-inversion embedding stored inside a PNG (or WebP), as A1111's
training tab saves them (``modules/textual_inversion/image_embedding.py``). Two forms, tried in A1111's
order (``EmbeddingDatabase.load_from_file``):

- a text chunk ``sd-ti-embedding``: base64 of the embedding as JSON, each tensor written as
  ``{"TORCHTENSOR": nested lists}``;
- hidden in the pixels: the zlib-compressed JSON split into low and high nibbles, each nibble block laid
  out as an RGB image (one value per channel, rows of the image's height), its values XORed with a
  linear congruential sequence (``seed = (1664525 * seed + 1013904223) mod 2**32``, each value
  ``seed mod 255``, its low 4 bits) and pasted left (low) and right (high) of the preview picture with
  a black column between; the high 4 bits of every data pixel are decoration. Reading: crop the black
  border, keep the low 4 bits, the first and last all-zero columns separate the blocks.

Every image goes through the one image gate (service/image_gate.py: size, bombs, text chunk limits);
the decompressed JSON is bounded too. What comes back is the dict A1111's JSON decoder gives (tensors
for ``TORCHTENSOR``), for embeddings.py's layout checks.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from typing import Any

import numpy as np
import torch

from service import image_gate

CHUNK = "sd-ti-embedding"
MAX_JSON_BYTES = 32 << 20  # the decompressed JSON of one embedding (kilobytes in practice)
FIELD = "embedding image"


class NoEmbedding(ValueError):
    """An image that holds no embedding (a preview image); the message says why."""


def read(raw: bytes) -> dict[str, Any]:
    """The embedding an image file holds. Raises :class:`NoEmbedding` for an image without one and
    ``image_gate.ImageInputError`` for a file the gate refuses; ``ValueError`` for damaged data."""
    chunks = image_gate.text_chunks(raw, FIELD)
    if CHUNK in chunks:
        try:
            text = base64.b64decode(chunks[CHUNK], validate=False)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"the {CHUNK} text chunk is not base64 ({exc})") from exc
        return _decode_json(text)
    img = image_gate.load(raw, FIELD).image
    return _decode_json(_inflate(_pixel_data(np.asarray(img.convert("RGB"), dtype=np.uint8))))


def _decode_json(text: bytes) -> dict[str, Any]:
    def tensors(d: dict[str, Any]) -> Any:
        if "TORCHTENSOR" in d:
            return torch.tensor(np.asarray(d["TORCHTENSOR"], dtype=np.float64))
        return d

    try:
        data = json.loads(text, object_hook=tensors)
    except (ValueError, TypeError, RecursionError) as exc:
        raise ValueError(f"the embedding data is not A1111's JSON ({str(exc)[:160]})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"the embedding data is a {type(data).__name__}, not an object")
    return data


def _crop_black(arr: np.ndarray) -> np.ndarray:
    """The smallest rectangle holding every pixel whose three channels are all non-zero."""
    lit = np.all(arr > 0, axis=2)
    cols, rows = np.flatnonzero(np.any(lit, axis=0)), np.flatnonzero(np.any(lit, axis=1))
    if cols.size == 0:
        return arr
    return arr[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _sequence(n: int) -> np.ndarray:
    """The first ``n`` values of A1111's LCG (low 4 bits), as uint8."""
    out = np.empty(n, dtype=np.uint8)
    seed = 0
    for i in range(n):
        seed = (1664525 * seed + 1013904223) % 4294967296
        out[i] = (seed % 255) & 0x0F
    return out


def _pixel_data(arr: np.ndarray) -> bytes:
    low = _crop_black(arr) & 0x0F
    empty = np.flatnonzero(low.sum(axis=(0, 2)) == 0)
    if empty.size < 2:
        raise NoEmbedding("no embedding data: neither an sd-ti-embedding text chunk nor data blocks")
    lower, upper = low[:, : empty[0], :], low[:, empty[-1] + 1 :, :]
    if lower.shape != upper.shape or lower.size == 0:
        raise NoEmbedding(
            f"no embedding data: the blocks left and right of the picture differ ({lower.shape} vs "
            f"{upper.shape})"
        )
    key = _sequence(lower.size).reshape(lower.shape)
    return ((upper ^ key) << 4 | (lower ^ key)).astype(np.uint8).tobytes()


def _inflate(data: bytes) -> bytes:
    """zlib's stream at the start of ``data`` (the blocks repeat it to fill their rectangle), at most
    MAX_JSON_BYTES of it."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, MAX_JSON_BYTES)
    except zlib.error as exc:
        raise ValueError(f"the embedding data blocks are not zlib data ({exc})") from exc
    if d.unconsumed_tail:
        raise ValueError(f"the embedding data decompresses to more than {MAX_JSON_BYTES} bytes")
    if not d.eof:
        raise ValueError("the embedding data blocks end before their zlib stream does")
    return out

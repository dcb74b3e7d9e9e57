"""Textual-inversion embedding files with the layouts real tools write.

- A1111's own training (``modules/textual_inversion/textual_inversion.py``, ``Embedding.save``):
  ``torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name", "step",
  "sd_checkpoint", "sd_checkpoint_name"})`` with ``vec`` a ``[vectors, 768]`` tensor that requires grad.
- kohya sd-scripts' ``train_textual_inversion.py`` safetensors: ``{"emb_params": [vectors, 768]}``.
- SDXL embeddings (kohya's SDXL TI, Civitai): ``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` safetensors.
- a diffusers concept (``learned_embeds.bin``): ``{"<token>": [768]}``.
- A1111's embedding images (``modules/textual_inversion/image_embedding.py``): the same data as JSON
  in a PNG's ``sd-ti-embedding`` text chunk, or hidden in its pixels.
"""

from __future__ import annotations

import base64
import json
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file
from torch import Tensor


def vectors(n: int, width: int, seed: int, std: float = 1.0) -> Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * std


def a1111_pt(path: Path, vec: Tensor, step: int = 1500) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vec.clone().requires_grad_(True)},
        "name": path.stem,
        "step": step,
        "sd_checkpoint": "a9263745",
        "sd_checkpoint_name": "v1-5-pruned-emaonly",
    }
    torch.save(data, path)
    return path


def a1111_pt_torch111(path: Path, vec: Tensor) -> Path:
    """The same as saved by A1111 under torch 1.11: ``string_to_param`` is a ``torch.nn.ParameterDict``
    (A1111 reads its ``_parameters``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vec.clone())})
    torch.save({"string_to_token": {"*": 265}, "string_to_param": params, "name": path.stem, "step": 7}, path)
    return path


def emb_params(path: Path, vec: Tensor) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"emb_params": vec.contiguous()}, str(path))
    return path


def sdxl_pair(path: Path, clip_l: Tensor, clip_g: Tensor) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"clip_l": clip_l.contiguous(), "clip_g": clip_g.contiguous()}, str(path))
    return path


def concept_bin(path: Path, token: str, vec: Tensor) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({token: vec}, path)
    return path


class _RunsCode:
    """Pickles as a call of os.system: what a malicious .pt does when unpickled without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def pickled_code(path: Path, marker: Path, vec: Tensor) -> Path:
    """An A1111-looking .pt that runs ``touch marker`` when loaded with plain pickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"string_to_param": {"*": vec}, "name": path.stem, "hook": _RunsCode(marker)}, path)
    return path


def _a1111_json(vec: Tensor, name: str) -> dict[str, Any]:
    """What A1111's image_embedding.py serialises (EmbeddingEncoder: a tensor as {"TORCHTENSOR": lists})."""
    return {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": {"TORCHTENSOR": vec.detach().float().numpy().tolist()}},
        "name": name,
        "step": 1500,
        "sd_checkpoint": "a9263745",
        "sd_checkpoint_name": "v1-5-pruned-emaonly",
    }


def a1111_image_chunk(path: Path, vec: Tensor, name: str) -> Path:
    """An embedding image as A1111's training saves one with "save images with embedding in PNG
    chunks": the preview picture plus a tEXt chunk ``sd-ti-embedding`` = base64 of the JSON."""
    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(json.dumps(_a1111_json(vec, name)).encode()).decode())
    path.parent.mkdir(parents=True, exist_ok=True)
    _picture(48, 48).save(path, pnginfo=info)
    return path


def _picture(w: int, h: int) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([40 + 3 * xx, 60 + 2 * yy, 90 + xx + yy], -1) % 200 + 30  # no black pixel in it
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def _lcg_nibbles(n: int) -> np.ndarray:
    """A1111's xor_block key: lcg(m=2**32, a=1664525, c=1013904223, seed=0), each value % 255, & 0x0F."""
    out, seed = [], 0
    for _ in range(n):
        seed = (1664525 * seed + 1013904223) % 2**32
        out.append((seed % 255) & 0x0F)
    return np.array(out, dtype=np.uint8)


def a1111_image_pixels(path: Path, vec: Tensor, name: str, height: int = 48) -> Path:
    """An embedding image with the data in its pixels, laid out as A1111's insert_image_data_embed does:
    zlib (level 9) of the JSON, low / high nibbles each np.resize'd to A1111's padded length and shaped
    (height, -1, 3), decorated in the high nibbles (A1111 draws dots there), XORed with the LCG key in
    the low nibbles, pasted left and right of the picture with one black column between."""
    packed = np.frombuffer(zlib.compress(json.dumps(_a1111_json(vec, name)).encode(), level=9), np.uint8)
    d, h = 3, height
    size = packed.size + (h - packed.size % h)
    size = size + (h * d - size % (h * d))
    rng = np.random.default_rng(0)
    blocks = []
    for nibbles in (packed & 0x0F, packed >> 4):
        block = np.resize(nibbles, size).reshape(h, -1, d).astype(np.uint8)
        block ^= (rng.integers(1, 16, block.shape) << 4).astype(np.uint8)  # A1111's style_block dots
        block ^= _lcg_nibbles(block.size).reshape(block.shape)
        blocks.append(Image.fromarray(block, "RGB"))
    low, high = blocks
    picture = _picture(h, h)
    out = Image.new("RGB", (picture.width + low.width + high.width + 2, h), (0, 0, 0))
    out.paste(low, (0, 0))
    out.paste(picture, (low.width + 1, 0))
    out.paste(high, (low.width + 1 + picture.width + 1, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    return path

"""Textual-inversion embedding files with the layouts real tools write.

- A1111's own training (``modules/textual_inversion/textual_inversion.py``, ``Embedding.save``):
  ``torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name", "step",
  "sd_checkpoint", "sd_checkpoint_name"})`` with ``vec`` a ``[vectors, 768]`` tensor that requires grad.
- kohya sd-scripts' ``train_textual_inversion.py`` safetensors: ``{"emb_params": [vectors, 768]}``.
- SDXL embeddings (kohya's SDXL TI, Civitai): ``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` safetensors.
- a diffusers concept (``learned_embeds.bin``): ``{"<token>": [768]}``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
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

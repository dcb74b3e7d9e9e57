"""IP-Adapter files in the store's ``ipadapter/`` folder, in the published layout (h94/IP-Adapter).

An adapter is one file named by its stem: ``ip-adapter_sd15.safetensors`` (flat ``image_proj.*`` and
``ip_adapter.<N>.to_k_ip.weight`` / ``to_v_ip.weight`` names) or ``.bin`` (the same two groups as a
nested dict, read with ``torch.load(weights_only=True)``: tensors only, no code runs). ``N`` counts
the UNet's attention processors in module order (self- and cross-attention alternate), so the k-th
cross-attention layer's weights are ``N = 2k + 1``.

CLIP image encoders are folders in the transformers ``CLIPVisionModelWithProjection`` layout
(``config.json`` + ``model.safetensors``), as h94's ``models/image_encoder``. The store may hold the
h94 layout as is (``models/``, ``sdxl_models/`` one level down). An adapter's encoder is the one whose
width fits its projection (the projected embedding for plain adapters, the hidden states for plus
adapters), the ``image_encoder`` folder next to the adapter first.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from service.models.file_names import is_file, listing, usable_name

SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
LAYER_KEY = re.compile(r"^(\d+)\.to_([kv])_ip\.weight$")


class IPAdapterError(ValueError):
    """An IP-Adapter file (or its image encoder) that cannot be used."""


@dataclass(frozen=True)
class AdapterFile:
    name: str
    path: Path


@dataclass(frozen=True)
class EncoderFolder:
    path: Path
    projection_dim: int
    hidden_size: int
    image_size: int


@dataclass
class AdapterWeights:
    """One adapter's tensors: ``kind`` "plain" (linear -> tokens + LayerNorm) or "plus" (Resampler),
    the projection's state dict (original names), and per cross-attention layer (to_k_ip, to_v_ip)."""

    kind: str
    image_proj: dict[str, Tensor]
    layers: list[tuple[Tensor, Tensor]]

    @property
    def embed_dim(self) -> int:
        """The width of the image embedding it projects (what its encoder must give)."""
        key = "proj.weight" if self.kind == "plain" else "proj_in.weight"
        return int(self.image_proj[key].shape[1])

    @property
    def cross_dim(self) -> int:
        return int(self.layers[0][0].shape[1])


def _folder(root: Path) -> Path:
    return Path(root) / "ipadapter"


def _is_encoder(p: Path) -> bool:
    return p.is_dir() and is_file(p / "config.json") and is_file(p / "model.safetensors")


def _walk(folder: Path, depth: int = 2) -> list[Path]:
    """Files and folders up to ``depth`` levels down (h94's repository layout is two), no links out."""
    out: list[Path] = []
    if depth < 0 or not folder.is_dir():
        return out
    for p in listing(folder):
        if p.name.startswith("."):
            continue
        out.append(p)
        if p.is_dir() and not p.is_symlink() and not _is_encoder(p):
            out += _walk(p, depth - 1)
    return out


def scan(root: Path) -> dict[str, AdapterFile]:
    """The adapters in ``<store>/ipadapter/`` by name (rescanned each time: new files appear)."""
    out: dict[str, AdapterFile] = {}
    for p in _walk(_folder(root)):
        if p.is_file() and p.suffix in SUFFIXES and usable_name(p.stem):
            out.setdefault(p.stem, AdapterFile(p.stem, p))
    return out


def encoders(root: Path) -> list[EncoderFolder]:
    """The CLIP vision encoder folders in the store's ``ipadapter/`` folder."""
    found = []
    for p in [_folder(root), *_walk(_folder(root))]:
        if not _is_encoder(p):
            continue
        try:
            cfg = json.loads((p / "config.json").read_text())
            vision = cfg.get("vision_config", cfg)  # a full CLIP config nests it
            found.append(
                EncoderFolder(
                    p,
                    int(cfg.get("projection_dim", vision.get("projection_dim", 512))),
                    int(vision["hidden_size"]),
                    int(vision.get("image_size", 224)),
                )
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a readable CLIP vision config: not an encoder
    return found


def pick_encoder(root: Path, adapter: AdapterFile, weights: AdapterWeights) -> EncoderFolder:
    """The encoder whose width fits the adapter's projection, the one next to it first."""
    width = weights.embed_dim
    all_enc = encoders(root)
    near = [e for e in all_enc if e.path.parent == adapter.path.parent]
    for enc in near + [e for e in all_enc if e not in near]:
        if (enc.projection_dim if weights.kind == "plain" else enc.hidden_size) == width:
            return enc
    what = "projection_dim" if weights.kind == "plain" else "hidden_size"
    have = [
        f"{e.path.name} ({what} {e.projection_dim if weights.kind == 'plain' else e.hidden_size})"
        for e in all_enc
    ]
    raise IPAdapterError(
        f"IP-Adapter {adapter.name!r} needs a CLIP image encoder with {what} {width} in the store's "
        f"ipadapter/ folder (a CLIPVisionModelWithProjection folder: config.json + model.safetensors); "
        f"found: {have or 'none'}"
    )


def _read(path: Path) -> dict[str, dict[str, Tensor]]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        flat = load_file(str(path))
        groups: dict[str, dict[str, Tensor]] = {"image_proj": {}, "ip_adapter": {}}
        for key, value in flat.items():
            head, _, rest = key.partition(".")
            if head in groups:
                groups[head][rest] = value
        return groups
    raw: Any = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(raw, dict):
        raise IPAdapterError(f"{path.name} holds no state dict")
    return raw


def read(adapter: AdapterFile) -> AdapterWeights:
    """An adapter file's tensors, checked for the layouts we run (plain and plus)."""
    try:
        groups = _read(adapter.path)
    except IPAdapterError:
        raise
    except Exception as exc:  # unreadable / truncated / not a tensor file
        raise IPAdapterError(f"IP-Adapter {adapter.name!r} could not be read: {exc}") from exc
    proj, ip = groups.get("image_proj"), groups.get("ip_adapter")
    if not isinstance(proj, dict) or not isinstance(ip, dict) or not proj or not ip:
        raise IPAdapterError(
            f"IP-Adapter {adapter.name!r}: no image_proj / ip_adapter tensors (not an IP-Adapter file)"
        )
    if "proj.weight" in proj and "norm.weight" in proj:
        kind = "plain"
    elif "latents" in proj and "proj_in.weight" in proj:
        kind = "plus"
    else:
        raise IPAdapterError(
            f"IP-Adapter {adapter.name!r}: only the plain and plus layouts are supported "
            "(not full-face or FaceID)"
        )
    pairs: dict[int, dict[str, Tensor]] = {}
    for key, value in ip.items():
        m = LAYER_KEY.match(key)
        if m is None or not isinstance(value, Tensor) or value.ndim != 2:
            raise IPAdapterError(f"IP-Adapter {adapter.name!r}: unexpected tensor ip_adapter.{key}")
        pairs.setdefault(int(m.group(1)), {})[m.group(2)] = value
    ids = sorted(pairs)
    if ids != list(range(1, 2 * len(ids), 2)) or any(set(p) != {"k", "v"} for p in pairs.values()):
        raise IPAdapterError(
            f"IP-Adapter {adapter.name!r}: ip_adapter layers are not 1, 3, 5, ... with k and v"
        )
    return AdapterWeights(kind, dict(proj), [(pairs[i]["k"], pairs[i]["v"]) for i in ids])

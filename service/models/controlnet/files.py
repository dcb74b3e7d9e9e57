"""ControlNet models in the store's ``controlnet/`` folder, and loading one.

Two layouts: a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, the
``.fp16`` variant too) named by the folder, and a single file named by its stem: original names
(``control_v11p_sd15_canny.pth`` / ``.safetensors``, ``control_model.*``; SD 2.x's
``control_v11p_sd21_*`` without the prefix) or diffusers' names without a config (SDXL's
``diffusers_xl_canny_full.safetensors``), the config read off the tensors. ``.pth`` files are read with
``torch.load(weights_only=True)``: tensors only, no code runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from service.models.file_names import is_file, listing, usable_name

from . import diffusers_keys, original_keys
from .net import ControlNet, ControlNetConfig, ControlNetConfigError
from .union import TYPES, UnionConfig, UnionControlNet, is_union, is_union_weights
from .union import infer as infer_union

SINGLE = (".safetensors", ".pth", ".pt", ".bin")
WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


class ControlNetError(ValueError):
    """A ControlNet file that does not load (unreadable, or not what its config says)."""


@dataclass(frozen=True)
class ControlNetFile:
    name: str
    path: Path  # the folder (diffusers) or the file (original)


def scan(root: Path) -> dict[str, ControlNetFile]:
    """The ControlNets in ``<store>/controlnet/`` by name (rescanned each time: new files appear)."""
    folder = Path(root) / "controlnet"
    out: dict[str, ControlNetFile] = {}
    if not folder.is_dir():
        return out
    for p in listing(folder):
        if p.is_dir() and is_file(p / "config.json") and any(is_file(p / w) for w in WEIGHTS):
            name = p.name
        elif p.is_file() and p.suffix in SINGLE:
            name = p.stem
        else:
            continue
        if usable_name(name):
            out.setdefault(name, ControlNetFile(name, p))
    return out


def _read_tensors(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    raw = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not all(isinstance(v, Tensor) for v in raw.values()):
        raise ControlNetConfigError(f"{path.name} holds no state dict of tensors")
    return raw


def _weights(folder: Path) -> Path:
    """A diffusers folder's weights file (the full-precision one when both are there)."""
    return next(folder / w for w in WEIGHTS if (folder / w).is_file())


read_tensors, weights = _read_tensors, _weights  # the Flux ControlNet folders' loader reads with these


def kind(info: ControlNetFile) -> str:
    """ "flux" for a diffusers FluxControlNetModel folder or a Flux ControlNet single file
    (flux_single.py), else "sd" (from the config or the tensor names, weights unread; what cannot
    be read is "sd" and fails where it loads)."""
    from . import flux_single

    try:
        if info.path.is_dir():
            raw = json.loads((info.path / "config.json").read_text())
            flux = isinstance(raw, dict) and raw.get("_class_name") == "FluxControlNetModel"
        else:
            flux = info.path.suffix == ".safetensors" and flux_single.is_flux(flux_single.keys_of(info.path))
    except (OSError, ValueError, RuntimeError):
        return "sd"
    return "flux" if flux else "sd"


def union_types(info: ControlNetFile) -> tuple[str, ...]:
    """The control types a union ControlNet serves, () for any other: SDXL's ControlNet-Union
    (union.TYPES' first ``num_control_type``) and Flux union models (flux_units.UNION_MODES' first
    ``num_mode``), read off the safetensors header (the type embedding's rows, as loading tells a
    union by its weights), no tensor read. A ``.pth`` / ``.bin`` file, whose names cannot be read
    without loading it, is ()."""
    from safetensors import safe_open

    from .flux_units import UNION_MODES

    path = _weights(info.path) if info.path.is_dir() else info.path
    if path.suffix != ".safetensors":
        return ()
    embeddings = {"task_embedding": TYPES, "controlnet_mode_embedder.weight": UNION_MODES}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in set(f.keys()) & set(embeddings):
                return embeddings[key][: int(f.get_slice(key).get_shape()[0])]
    except (OSError, ValueError, RuntimeError):
        pass
    return ()


def read(info: ControlNetFile) -> tuple[ControlNetConfig, dict[str, Tensor]]:
    """The config and the diffusers-named state dict of a ControlNet file or folder."""
    if info.path.is_dir():
        raw_cfg: dict[str, Any] = json.loads((info.path / "config.json").read_text())
        if raw_cfg.get("_class_name") == "FluxControlNetModel":
            raise ControlNetConfigError(f"{info.name} is a Flux ControlNet (FluxControlNetModel)")
        sd = _read_tensors(_weights(info.path))
        if is_union(raw_cfg) or is_union_weights(list(sd)):  # ControlNet-Union (union.py): the
            # union sizes as the tensors have them, whatever class the config names
            return UnionConfig.from_dict(raw_cfg | infer_union(sd)), sd
        return ControlNetConfig.from_dict(raw_cfg), sd
    sd = _read_tensors(info.path)
    if diffusers_keys.is_diffusers(list(sd)):  # SDXL's diffusers_xl_*.safetensors, a folder's weights
        if is_union_weights(list(sd)):  # xinsir's union / ProMax file on its own (union.py)
            return UnionConfig.from_dict(diffusers_keys.infer_config(sd) | infer_union(sd)), sd
        return ControlNetConfig.from_dict(diffusers_keys.infer_config(sd)), sd
    if not original_keys.is_original(list(sd)):
        raise ControlNetConfigError(
            f"{info.path.name}: not a ControlNet (neither input_hint_block nor controlnet_cond_embedding)"
        )
    sd = original_keys.to_diffusers(original_keys.strip(sd))
    return ControlNetConfig.from_dict(diffusers_keys.infer_config(sd)), sd


def load(info: ControlNetFile, device: torch.device, dtype: torch.dtype) -> ControlNet:
    """Build the network and load its weights strictly (a missing or extra tensor is an error)."""
    try:
        cfg, sd = read(info)
        net = UnionControlNet(cfg) if isinstance(cfg, UnionConfig) else ControlNet(cfg)
        missing, unexpected = net.load_state_dict(sd, strict=False)
    except (ControlNetConfigError, OSError, RuntimeError, ValueError, KeyError) as exc:
        raise ControlNetError(f"ControlNet {info.name!r} could not be loaded: {exc}") from exc
    if missing or unexpected:
        raise ControlNetError(
            f"ControlNet {info.name!r} does not match its config: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    return net.to(device, dtype).eval()


def family(cfg: ControlNetConfig | Any) -> str:
    """A readable base-model family for a UNet / ControlNet config (the 422 names it)."""
    get = (lambda k: getattr(cfg, k, None)) if not isinstance(cfg, dict) else cfg.get
    dim = get("cross_attention_dim")
    if get("addition_embed_type") == "text_time":
        return f"SDXL (cross_attention_dim {dim})"
    return {768: "SD 1.x", 1024: "SD 2.x"}.get(int(dim or 0), "SD") + f" (cross_attention_dim {dim})"


def size(info: ControlNetFile) -> int:
    """Bytes on disk of a ControlNet's weights (what loading it adds, about)."""
    return (_weights(info.path) if info.path.is_dir() else info.path).stat().st_size


def held_bytes(net: torch.nn.Module) -> int:
    """Bytes of a loaded network's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()])

"""Load flow-matching models (SD3 / SD3.5, Flux): diffusers layout or single file, local safetensors only.

A folder with ``model_index.json`` and one sub-folder per component: ``transformer`` (SD3's
MMDiT or Flux's transformer), ``vae``, ``text_encoder`` (CLIP-L), ``text_encoder_2`` (SD3: CLIP-G;
Flux: T5), SD3's optional ``text_encoder_3`` (T5), their tokenizers, and ``scheduler`` (its
config gives the shift). Each component is built by the class its model_index entry names, from
``diffusers`` or ``transformers`` only; weights must be ``.safetensors`` (nothing is unpickled).

Single file: the transformer's weights in one ``.safetensors`` file in the original layout (the
SD3 / SD3.5 release files' ``model.diffusion_model.*``, Flux's ``double_blocks`` /
``single_blocks``), converted by diffusers' key maps for these layouts, plus a diffusers-layout
``config`` folder with everything else (``transformer/config.json`` only; the VAE, text
encoders, tokenizers and scheduler config with their weights), as ComfyUI users keep them.
What single files people share (all-in-one, fp8, ComfyUI's scaled fp8) is read by
``transformer_file.read_transformer``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.models.sd_loader import SDLoadError
from service.models.transformer_file import read_transformer

LIBRARIES = ("diffusers", "transformers")
FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}


@dataclass
class FlowComponents:
    family: str  # "sd3" | "flux"
    transformer: Any
    vae: Any
    text_encoders: dict[str, Any]  # by model_index name: text_encoder, text_encoder_2, text_encoder_3
    tokenizers: dict[str, Any]  # tokenizer, tokenizer_2, tokenizer_3
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    model_index: dict[str, Any] = field(default_factory=dict)
    source: str = "diffusers"


def _json(path: Path, root: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SDLoadError(f"missing file {path.relative_to(root)} in {root}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SDLoadError(f"{path.relative_to(root)}: not JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise SDLoadError(f"{path.relative_to(root)}: expected a JSON object")
    return data


def _class(lib: str, name: str, where: str) -> Any:
    if lib not in LIBRARIES or not isinstance(name, str) or not name.isidentifier():
        raise SDLoadError(f"{where}: component class {lib}.{name} is not one this service loads")
    cls = getattr(importlib.import_module(lib), name, None)
    if cls is None:
        raise SDLoadError(f"{where}: {lib} has no class {name}")
    return cls


def _load(cls: Any, sub: Path, root: Path, name: str) -> Any:
    if name.startswith("tokenizer"):
        return cls.from_pretrained(str(sub), local_files_only=True)
    unsafe = [p.name for p in sub.iterdir() if p.suffix in (".bin", ".pt", ".ckpt", ".pth")]
    if unsafe and not any(p.suffix == ".safetensors" for p in sub.iterdir()):
        raise SDLoadError(f"{sub.relative_to(root)}: only .safetensors weights are loaded, found {unsafe}")
    kw: dict[str, Any] = {"local_files_only": True, "use_safetensors": True}
    if cls.__module__.startswith("diffusers") and importlib.util.find_spec("accelerate") is None:
        kw["low_cpu_mem_usage"] = False
    try:
        return cls.from_pretrained(str(sub), **kw).eval()
    except Exception as exc:
        raise SDLoadError(
            f"{sub.relative_to(root)}: cannot load {name} ({type(exc).__name__}: {exc})"
        ) from exc


def _single_file(cls: Any, path: Path, config: Path) -> Any:
    if path.suffix.lower() == ".gguf" and path.is_file():
        return _gguf(cls, path, config)
    if path.suffix != ".safetensors" or not path.is_file():
        raise SDLoadError(
            f"{path.name}: a single-file transformer must be an existing .safetensors or .gguf file"
        )
    state = read_transformer(path)  # the transformer's keys only, fp8 scales multiplied out
    if cls.__name__ == "FluxTransformer2DModel":
        return _flux_single_file(cls, state, path, config)
    kw: dict[str, Any] = {"config": str(config), "subfolder": "transformer", "local_files_only": True}
    if importlib.util.find_spec("accelerate") is None:
        kw["low_cpu_mem_usage"] = False
    try:
        return cls.from_single_file(state, **kw).eval()
    except Exception as exc:
        raise SDLoadError(f"{path.name}: cannot load the transformer ({type(exc).__name__}: {exc})") from exc


def _gguf(cls: Any, path: Path, config: Path) -> Any:
    """A quantized transformer (city96's GGUF files), kept quantized: service/models/quant."""
    from service.models.quant.gguf_file import GGUFError
    from service.models.quant.load import load_transformer

    try:
        return load_transformer(cls, path, config, FAMILIES[cls.__name__])
    except GGUFError as exc:
        raise SDLoadError(str(exc)) from exc
    except (KeyError, RuntimeError, ValueError) as exc:
        raise SDLoadError(
            f"{path.name}: cannot load the GGUF transformer ({type(exc).__name__}: {exc})"
        ) from exc


def _flux_single_file(cls: Any, sd: dict[str, Any], path: Path, config: Path) -> Any:
    """Flux through our own key map (service/models/flux_keys.py): sizes from the config. The model
    is built on the meta device and takes the file's tensors as they are (FlowModel casts it once):
    no float32 copy of a 12B model next to the file's weights."""
    import torch

    from service.models.flux_keys import flux_to_diffusers

    with torch.device("meta"):
        model = cls.from_config(cls.load_config(str(config / "transformer")))
    inner = int(model.config.num_attention_heads) * int(model.config.attention_head_dim)
    try:
        if not any(".double_blocks." in f".{k}" for k in sd) and set(sd) == set(model.state_dict()):
            pass  # a diffusers-named single file (the transformer's own state dict)
        else:
            sd = flux_to_diffusers(sd, inner, int(inner * 4.0))
        model.load_state_dict(sd, strict=True, assign=True)
    except (KeyError, RuntimeError) as exc:
        raise SDLoadError(f"{path.name}: not a Flux transformer in the original layout ({exc})") from exc
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise SDLoadError(f"{path.name}: the file lacks {left[:4]}")
    return model.eval()


def load_flow_diffusers(root: Path, transformer_file: Path | None = None) -> FlowComponents:
    """The components of a diffusers-layout SD3 or Flux folder (``transformer_file``: the
    transformer from one original-layout checkpoint, ``root`` holding only its config.json)."""
    index = _json(root / "model_index.json", root)
    entry = index.get("transformer")
    if not isinstance(entry, list) or entry[1] not in FAMILIES:
        raise SDLoadError(f"{root}: model_index.json names no SD3 or Flux transformer ({entry!r})")
    parts: dict[str, Any] = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            continue
        if name == "scheduler":
            continue
        sub = root / name
        if not sub.is_dir():
            raise SDLoadError(f"{root}: missing component folder {name}/")
        cls = _class(spec[0], spec[1], f"model_index.json {name}")
        if name == "transformer" and transformer_file is not None:
            parts[name] = _single_file(cls, transformer_file, root)
        else:
            parts[name] = _load(cls, sub, root, name)
    sched = root / "scheduler" / "scheduler_config.json"
    sched_cfg = _json(sched, root) if sched.is_file() else {}
    for need in ("vae", "text_encoder", "tokenizer"):
        if need not in parts:
            raise SDLoadError(f"{root}: model_index.json has no {need}")
    return FlowComponents(
        family=FAMILIES[entry[1]],
        transformer=parts["transformer"],
        vae=parts["vae"],
        text_encoders={k: v for k, v in parts.items() if k.startswith("text_encoder")},
        tokenizers={k: v for k, v in parts.items() if k.startswith("tokenizer")},
        scheduler_config=sched_cfg,
        model_index=index,
    )

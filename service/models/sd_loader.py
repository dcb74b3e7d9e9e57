"""Load Stable Diffusion components (UNet, VAE, CLIP text encoders, tokenizers, scheduler config).

Two layouts, both read from local files only (never from a hub):

- diffusers: a folder with model_index.json and unet/, vae/, text_encoder(_2)/, tokenizer(_2)/,
  scheduler/ subfolders;
- single file: one checkpoint in the original (CompVis / SGM) layout, plus a diffusers-layout
  *config* folder (the same tree without weights) that supplies the component configs, the
  tokenizer files and the scheduler config.

Weights are safetensors; pickle checkpoints (.ckpt/.pt/.bin) are refused unless the manifest
sets ``allow_pickle: true``, and are then read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
# Original-layout key prefixes of the first and second text encoder (SD 1.x/2.x; SDXL).
TEXT_ENCODER_PREFIXES = (("cond_stage_model.", "conditioner.embedders.0."), ("conditioner.embedders.1.",))


class SDLoadError(ValueError):
    """A Stable Diffusion model that cannot be loaded; the message names the file at fault."""


@dataclass
class SDComponents:
    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    text_encoders: list[Any]  # transformers CLIPTextModel / CLIPTextModelWithProjection
    tokenizers: list[Any]
    scheduler_config: dict[str, Any]
    model_index: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # "diffusers" or "single_file"

    @property
    def is_sdxl(self) -> bool:
        return getattr(self.unet.config, "addition_embed_type", None) == "text_time"


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _read_json(path: Path, root: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SDLoadError(f"missing file {_rel(path, root)} in {root}")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SDLoadError(f"{_rel(path, root)}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise SDLoadError(f"{_rel(path, root)}: expected a JSON object")
    return data


def _weights_file(sub: Path, root: Path, stem: str, variant: str | None, allow_pickle: bool) -> Path:
    """The component's weights file (safetensors first); a pickle file only when allowed."""
    names = [f"{stem}.{variant}.safetensors"] if variant else []
    names.append(f"{stem}.safetensors")
    for name in names:
        if (sub / name).is_file():
            return sub / name
    pickled = [sub / f"{stem}.bin"] + ([sub / f"{stem}.{variant}.bin"] if variant else [])
    for path in pickled:
        if path.is_file():
            if not allow_pickle:
                raise SDLoadError(
                    f"{_rel(path, root)} is a pickle file; only safetensors load unless the manifest "
                    "sets allow_pickle: true"
                )
            return path
    raise SDLoadError(f"missing weights {_rel(sub / names[-1], root)} in {root}")


def _components(index: dict[str, Any]) -> list[str]:
    return [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0]]


def _text_encoder_class(name: str, index: dict[str, Any], root: Path) -> type[nn.Module]:
    import transformers

    cls_name = index.get(name, [None, "CLIPTextModel"])[1]
    if cls_name not in TEXT_ENCODER_CLASSES:
        raise SDLoadError(
            f"model_index.json: {name} is {cls_name!r}; supported: {', '.join(TEXT_ENCODER_CLASSES)}"
        )
    return getattr(transformers, cls_name)  # type: ignore[no-any-return]


def _load_tokenizer(sub: Path, root: Path) -> Any:
    from transformers import CLIPTokenizer

    if not (sub / "tokenizer.json").is_file():
        for name in ("vocab.json", "merges.txt"):
            if not (sub / name).is_file():
                raise SDLoadError(f"missing tokenizer file {_rel(sub / name, root)} in {root}")
    try:
        return CLIPTokenizer.from_pretrained(str(sub), local_files_only=True)
    except Exception as exc:
        raise SDLoadError(f"{_rel(sub, root)}: cannot load the tokenizer ({exc})") from exc


def _tokenizers_and_index(cfg_root: Path) -> tuple[dict[str, Any], list[str], list[Any], dict[str, Any]]:
    index = _read_json(cfg_root / "model_index.json", cfg_root)
    comps = _components(index)
    for needed in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if needed not in comps:
            raise SDLoadError(f"model_index.json in {cfg_root} lists no {needed!r} component")
    enc_names: list[str] = [n for n in ("text_encoder", "text_encoder_2") if n in comps]
    tokenizers = [
        _load_tokenizer(cfg_root / n.replace("text_encoder", "tokenizer"), cfg_root) for n in enc_names
    ]
    sched = _read_json(cfg_root / "scheduler" / "scheduler_config.json", cfg_root)
    return index, enc_names, tokenizers, sched


def load_diffusers(root: Path, *, variant: str | None = None, allow_pickle: bool = False) -> SDComponents:
    """Components from a diffusers-layout folder (configs and weights read locally)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    index, enc_names, tokenizers, sched = _tokenizers_and_index(root)
    no_accel = importlib.util.find_spec("accelerate") is None
    models: dict[str, nn.Module] = {}
    specs: list[tuple[str, Any, str]] = [
        ("unet", UNet2DConditionModel, "diffusion_pytorch_model"),
        ("vae", AutoencoderKL, "diffusion_pytorch_model"),
    ]
    specs += [(n, _text_encoder_class(n, index, root), "model") for n in enc_names]
    for name, cls, stem in specs:
        sub = root / name
        _read_json(sub / "config.json", root)
        weights = _weights_file(sub, root, stem, variant, allow_pickle)
        try:
            models[name] = cls.from_pretrained(
                str(sub),
                local_files_only=True,
                use_safetensors=weights.suffix == ".safetensors",
                variant=variant if variant and variant in weights.name else None,
                **(
                    {"low_cpu_mem_usage": False}
                    if cls.__module__.startswith("diffusers") and no_accel
                    else {}
                ),
            )
        except Exception as exc:
            raise SDLoadError(
                f"{_rel(weights, root)}: cannot load {name} ({type(exc).__name__}: {exc})"
            ) from exc
    encoders = [models[n] for n in enc_names]
    return SDComponents(models["unet"], models["vae"], encoders, tokenizers, sched, index, "diffusers")


def read_checkpoint(path: Path, root: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A single-file state dict: safetensors, or (only if allowed) a pickle read with weights_only."""
    if not path.is_file():
        raise SDLoadError(f"missing checkpoint {_rel(path, root)} in {root}")
    if path.suffix == ".safetensors":
        from service.models.transformer_file import read_weights

        return read_weights(path, where=_rel(path, root))  # ComfyUI's scaled fp8 multiplied out
    if path.suffix not in PICKLE_SUFFIXES:
        raise SDLoadError(f"{_rel(path, root)}: unknown checkpoint type; use .safetensors")
    if not allow_pickle:
        raise SDLoadError(
            f"{_rel(path, root)} is a pickle checkpoint; only safetensors load unless the manifest "
            "sets allow_pickle: true"
        )
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SDLoadError(f"{_rel(path, root)}: refused or unreadable pickle ({exc})") from exc
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise SDLoadError(f"{_rel(path, root)}: the checkpoint holds no state dict")
    return state


def load_single_file(ckpt: Path, cfg_root: Path, root: Path, *, allow_pickle: bool = False) -> SDComponents:
    """Components from one original-layout checkpoint, configured by a diffusers-layout config folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    index, enc_names, tokenizers, sched = _tokenizers_and_index(cfg_root)
    state = read_checkpoint(ckpt, root, allow_pickle)
    name = _rel(ckpt, root)
    for sub in ("unet", "vae", *enc_names):
        _read_json(cfg_root / sub / "config.json", cfg_root)
    if not any(k.startswith("model.diffusion_model.") for k in state):
        raise SDLoadError(
            f"{name}: no UNet weights (model.diffusion_model.*); is it an original-layout SD file?"
        )
    if not any(k.startswith("first_stage_model.") for k in state):
        raise SDLoadError(f"{name}: no VAE weights (first_stage_model.*)")
    for i, enc_name in enumerate(enc_names):
        prefixes = TEXT_ENCODER_PREFIXES[i]
        if not any(k.startswith(prefixes) for k in state):
            raise SDLoadError(f"{name}: no {enc_name} weights ({' or '.join(p + '*' for p in prefixes)})")
    cfg = str(cfg_root)
    try:
        unet = UNet2DConditionModel.from_single_file(
            state, config=cfg, subfolder="unet", local_files_only=True
        )
        vae = AutoencoderKL.from_single_file(state, config=cfg, subfolder="vae", local_files_only=True)
        encoders = [
            create_diffusers_clip_model_from_ldm(
                _text_encoder_class(n, index, cfg_root), state, subfolder=n, config=cfg, local_files_only=True
            )
            for n in enc_names
        ]
    except SDLoadError:
        raise
    except Exception as exc:
        raise SDLoadError(
            f"{name}: does not match the configs in {cfg_root} ({type(exc).__name__}: {exc})"
        ) from exc
    for enc_name, enc in zip(enc_names, encoders, strict=True):
        if any(p.is_meta for p in enc.parameters()):
            raise SDLoadError(f"{name}: {enc_name} weights missing from the checkpoint")
    return SDComponents(unet, vae, encoders, tokenizers, sched, index, "single_file")


def check_consistency(c: SDComponents, where: str) -> None:
    """Configs that must agree across components; a mismatch names both config files."""
    ucfg = c.unet.config
    widths = [int(e.config.hidden_size) for e in c.text_encoders]
    ctx = sum(widths) if c.is_sdxl else widths[0]
    if int(ucfg.cross_attention_dim) != ctx:
        raise SDLoadError(
            f"{where}: unet/config.json cross_attention_dim={ucfg.cross_attention_dim} does not match the "
            f"text encoder width {ctx} (text_encoder*/config.json hidden_size {widths})"
        )
    latent = int(c.vae.config.latent_channels)
    if int(ucfg.in_channels) not in (latent, 2 * latent + 1):
        raise SDLoadError(
            f"{where}: unet/config.json in_channels={ucfg.in_channels} fits neither vae/config.json "
            f"latent_channels={latent} nor an inpainting UNet ({2 * latent + 1})"
        )
    if c.is_sdxl:
        if len(c.text_encoders) != 2:
            raise SDLoadError(f"{where}: an SDXL UNet needs text_encoder and text_encoder_2")
        pooled = int(getattr(c.text_encoders[-1].config, "projection_dim", 0))
        want = pooled + 6 * int(ucfg.addition_time_embed_dim)
        if int(ucfg.projection_class_embeddings_input_dim) != want:
            raise SDLoadError(
                f"{where}: unet/config.json projection_class_embeddings_input_dim="
                f"{ucfg.projection_class_embeddings_input_dim} != text_encoder_2 projection_dim {pooled} "
                f"+ 6 * addition_time_embed_dim ({want})"
            )

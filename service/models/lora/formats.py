"""LoRA files: every key layout diffusers' Stable Diffusion loader accepts, read into one form.

Per adapted layer a file stores a down (A) and an up (B) matrix, and optionally an alpha. The layouts
(the key names the tools that write real files use):

- kohya / A1111 (sd-scripts ``networks/lora.py``): ``lora_unet_<module path, dots as underscores>``,
  ``lora_te_`` for the text encoder (SDXL: ``lora_te1_`` / ``lora_te2_``), then ``.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha`` (update ``up @ down * alpha / rank``; no alpha, or 0: scale 1).
  SD1/SD2 UNet paths are diffusers' (``down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``);
  SDXL ones the original SGM UNet's (``input_blocks_4_1_transformer_blocks_0_attn1_to_q``, mapped in
  :mod:`.names`); LoCon adds the resnet / down- / upsampler convs. Text-encoder paths carry
  ``text_model_`` (``lora_te_text_model_encoder_layers_0_mlp_fc1``) whether or not the installed
  transformers' CLIP has that level (:mod:`.names` matches either way).
- PEFT / diffusers: ``unet.<dotted path>.lora_A.weight`` / ``.lora_B.weight``, ``text_encoder.``,
  ``text_encoder_2.``; scale 1 (PEFT's ``lora_alpha = r``) unless the file has ``.alpha`` entries or
  diffusers' ``lora_adapter_metadata`` header (``lora_alpha``, ``r``, ``alpha_pattern``).
- older diffusers: ``.lora.down.weight`` / ``.lora.up.weight``, ``.lora_linear_layer.down.weight``
  (text encoder), attention processors ``...attn1.processor.to_q_lora.down.weight`` (``to_out_lora``
  = ``to_out.0``; in a text encoder ``to_q_lora`` = ``q_proj``), and the first diffusers files with
  no ``unet.`` prefix at all (``down_blocks.0...processor.to_q_lora.down.weight``).

- SD3 / Flux: PEFT ``transformer.<path>`` keys (the denoising network is the "unet" component here);
  Flux's BFL / kohya / XLabs layouts (:mod:`.flux`) and SD3's original MMDiT names (:mod:`.sd3`) are
  rewritten into those first.

Refused, naming the key: LyCORIS (LoHa ``hada_``, LoKr ``lokr_``, OFT, Tucker ``lora_mid``, full
``diff``), DoRA (``dora_scale``, ``lora_magnitude_vector``), LoRA biases, non-finite numbers, and any
key that is none of the above (as diffusers does: an unknown key is a file we would half apply).

Module paths are kept "flat" (dots as underscores, as kohya writes them); :mod:`.names` matches them
to a model's own modules.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIX = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                "lora_te2_": "text_encoder_2"}  # fmt: skip
# "unet" is the denoising network: SD's UNet, or SD3's / Flux's transformer (diffusers' "transformer.")
DIFFUSERS_PREFIX = {"unet.": "unet", "transformer.": "unet", "text_encoder.": "text_encoder",
                    "text_encoder_2.": "text_encoder_2"}  # fmt: skip
# The first diffusers LoRA files (attention processors) had no component prefix: UNet paths.
BARE_UNET = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "time_embedding.")
# Longest first: ".lora.down.weight" also ends with "_lora.down.weight"'s tail.
SUFFIXES = (
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    ("_lora.down.weight", "down"),  # old attention processors: ...processor.to_q_lora.down.weight
    ("_lora.up.weight", "up"),
    (".alpha", "alpha"),
)
UNSUPPORTED = (
    (re.compile(r"dora_scale|lora_magnitude_vector"), "DoRA (weight-decomposed LoRA)"),
    (re.compile(r"\.hada_"), "LyCORIS LoHa"),
    (re.compile(r"\.lokr_"), "LyCORIS LoKr"),
    (re.compile(r"\.(oft_|boft_)|\.oft_blocks|\.rescale$"), "LyCORIS OFT / BOFT"),
    (re.compile(r"\.lora_mid\."), "LyCORIS LoCon with Tucker decomposition (lora_mid)"),
    (re.compile(r"\.(diff|diff_b|w_norm|b_norm)$"), "LyCORIS full / norm layers"),
    (re.compile(r"\.(lora_B|lora_up|lora\.up|lora_A|lora_down|lora\.down)\.bias$"), "LoRA biases"),
    (re.compile(r"^lora_te3_"), "a T5 text-encoder LoRA (lora_te3_)"),
)
# Old processor names of the attention projections.
PROCESSOR_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
PROCESSOR_TEXT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


class LoraFormatError(ValueError):
    """A file that is not a LoRA this service can apply (the message says why, naming the key)."""


@dataclass
class LoraWeight:
    """One adapted layer: ``delta(x) = up(down(x)) * scale`` (linear, or conv then 1x1 conv).

    ``key`` is the layer's name as the file spells it (for messages); ``path`` its dotted module path
    where the file gives one (diffusers / PEFT: metadata patterns match on it)."""

    down: Tensor
    up: Tensor
    alpha: float | None = None
    key: str = ""

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        # kohya: "if alpha == 0 or None, alpha is rank (no scaling)"
        return 1.0 if not self.alpha else self.alpha / self.rank


def flat(path: str) -> str:
    return path.replace(".", "_")


def _refusal(key: str) -> str | None:
    return next((what for pattern, what in UNSUPPORTED if pattern.search(key)), None)


def _split(key: str) -> tuple[str, str, str, str] | None:
    """(component, module path as the file has it, flat module path, part) of one key; None for a
    key in no LoRA layout."""
    suffix, part = next(((s, p) for s, p in SUFFIXES if key.endswith(s)), (None, None))
    if suffix is None or part is None:
        return None
    stem = key[: -len(suffix)]
    kohya = next((p for p in KOHYA_PREFIX if stem.startswith(p)), None)
    if kohya is not None:
        module = stem[len(kohya) :]
        return None if "." in module else (KOHYA_PREFIX[kohya], stem, module, part)
    prefix = next((p for p in DIFFUSERS_PREFIX if stem.startswith(p)), None)
    if prefix is not None:
        comp, module = DIFFUSERS_PREFIX[prefix], stem[len(prefix) :]
    elif stem.startswith(BARE_UNET):
        comp, module = "unet", stem
    else:
        return None
    module = module.replace(".processor.", ".")
    if suffix.startswith("_lora."):  # ...to_q_lora.down.weight: module path ends with to_q
        head, _, proj = module.rpartition(".")
        names = PROCESSOR_UNET if comp == "unet" else PROCESSOR_TEXT
        if proj not in names:
            return None
        module = f"{head}.{names[proj]}" if head else names[proj]
    return comp, stem, module, part


def _peft_alphas(meta: dict[str, str]) -> dict[str, dict[str, Any]]:
    """diffusers' ``lora_adapter_metadata`` header (the LoraConfig of each component) by component."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise LoraFormatError(f"lora_adapter_metadata is not JSON: {exc}") from exc
    out: dict[str, dict[str, Any]] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            comp, _, field = str(key).partition(".")
            if comp in COMPONENTS and field:
                out.setdefault(comp, {})[field] = value
    return out


def _pattern_value(patterns: Any, path: str) -> Any:
    """PEFT's rank/alpha pattern lookup: a key (a regex) matches a module path that ends with it, or
    (``^`` first) the whole path."""
    if not isinstance(patterns, dict):
        return None
    for key, value in patterns.items():
        key = str(key)
        regex = key[1:] if key.startswith("^") else rf"(.*\.)?{key}"
        try:
            if re.fullmatch(regex, path):
                return value
        except re.error:
            continue
    return None


def _metadata_alpha(config: dict[str, Any], path: str, rank: int, where: str) -> float | None:
    """The alpha PEFT gives a layer from a component's LoraConfig (None: no ``lora_alpha`` there)."""
    alpha = _pattern_value(config.get("alpha_pattern"), path)
    alpha = config.get("lora_alpha") if alpha is None else alpha
    if alpha is None:
        return None
    try:
        value = float(alpha)
    except (TypeError, ValueError) as exc:
        raise LoraFormatError(f"{where}: lora_adapter_metadata lora_alpha {alpha!r} is not a number") from exc
    if config.get("use_rslora"):  # rsLoRA scales by alpha / sqrt(r): as an alpha over r
        value *= math.sqrt(rank)
    return value


def _checked(entry: tuple[str, Tensor], where: str) -> Tensor:
    key, value = entry
    t = value.float()
    if not bool(torch.isfinite(t).all()):
        raise LoraFormatError(f"{where}: key {key!r} holds NaN or infinite numbers")
    return t


def parse_state_dict(
    state: dict[str, Tensor], where: str, metadata: dict[str, str] | None = None
) -> tuple[dict[str, dict[str, LoraWeight]], str]:
    """The layers of a LoRA state dict by component and flat module path, and its format name."""
    from .flux import is_flux, to_diffusers
    from .sd3 import SD3, is_sd3

    parts: dict[tuple[str, str], dict[str, Any]] = {}
    kinds = set()
    for key in state:
        what = _refusal(key)
        if what is not None:
            raise LoraFormatError(f"{where}: key {key!r}: {what} is not supported, only plain LoRA")
    if is_flux(list(state)):  # BFL / kohya / XLabs Flux names: into diffusers' transformer names
        state = to_diffusers(state, where)
        kinds.add("flux")
    elif is_sd3(list(state)):  # SD3's original MMDiT names (kohya, ComfyUI): the same way
        state = to_diffusers(state, where, SD3)
        kinds.add("sd3")
    for key, value in state.items():
        split = _split(key)
        if split is None:
            raise LoraFormatError(
                f"{where}: key {key!r} is in no LoRA layout this service reads (kohya lora_unet_ / "
                "lora_te_, diffusers / PEFT unet. / transformer. / text_encoder. with lora_A / lora_B, "
                "Flux's BFL / kohya / XLabs names)"
            )
        comp, stem, module, part = split
        if not kinds & {"flux", "sd3"}:
            kinds.add("kohya" if key.startswith("lora_") else "diffusers")
        entry = parts.setdefault((comp, flat(module)), {"key": stem, "path": module})
        if part in entry:
            raise LoraFormatError(f"{where}: key {key!r}: layer {stem!r} has two {part} entries")
        entry[part] = (key, value)
    if not parts:
        raise LoraFormatError(f"{where}: no LoRA layers found (expected kohya or diffusers/PEFT keys)")
    configs = _peft_alphas(metadata or {})
    out: dict[str, dict[str, LoraWeight]] = {}
    for (comp, module), p in parts.items():
        if "down" not in p or "up" not in p:
            raise LoraFormatError(f"{where}: layer {p['key']!r} lacks its down or up matrix")
        down, up = _checked(p["down"], where), _checked(p["up"], where)
        if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0]:
            raise LoraFormatError(
                f"{where}: layer {p['key']!r}: up {tuple(up.shape)} does not fit down {tuple(down.shape)}"
            )
        if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
            raise LoraFormatError(f"{where}: layer {p['key']!r}: a conv up matrix must be 1x1")
        alpha = None
        if "alpha" in p:
            a = _checked(p["alpha"], where)
            if a.numel() != 1:
                raise LoraFormatError(f"{where}: key {p['alpha'][0]!r}: an alpha is one number")
            alpha = float(a.reshape(()))
        elif comp in configs:
            alpha = _metadata_alpha(configs[comp], p["path"], int(down.shape[0]), where)
        out.setdefault(comp, {})[module] = LoraWeight(down, up, alpha, p["key"])
    return out, "+".join(sorted(kinds))


def read_lora(path: Path) -> tuple[dict[str, dict[str, LoraWeight]], str, dict[str, str]]:
    """A LoRA file's layers, its format, and its metadata (e.g. ``ss_base_model_version``)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iteration)
    except Exception as exc:
        raise LoraFormatError(f"{path.name}: not a readable .safetensors file: {exc}") from exc
    layers, fmt = parse_state_dict(state, path.name, meta)
    return layers, fmt, meta

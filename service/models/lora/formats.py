"""LoRA files: kohya/A1111 and diffusers/PEFT ``.safetensors`` state dicts, read into one form.

Both store, per adapted layer, a down (A) and an up (B) matrix, and optionally an alpha:

- kohya / A1111: ``lora_unet_<module_path_with_underscores>.lora_down.weight`` / ``.lora_up.weight``
  / ``.alpha``; ``lora_te_`` (``lora_te1_`` / ``lora_te2_`` for SDXL's two encoders) for the text
  encoders. The update is ``up @ down * alpha / rank`` (no alpha: ``alpha = rank``).
- diffusers / PEFT: ``unet.<module.path>.lora_A.weight`` / ``.lora_B.weight`` (older diffusers:
  ``.lora.down.weight`` / ``.lora.up.weight``), ``text_encoder.`` / ``text_encoder_2.``; the scale is
  1 (PEFT's ``lora_alpha = r``) unless the file has ``.alpha`` entries.

Conv layers: down is ``[rank, in, kh, kw]`` (the base conv's kernel, stride and padding), up is
``[out, rank, 1, 1]``. LyCORIS (LoHa, LoKr, ...) is refused with a clear message.

Module paths are kept "flat" (dots as underscores, as kohya writes them) and matched to a model's
own module names the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from torch import Tensor

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIX = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                "lora_te2_": "text_encoder_2"}  # fmt: skip
DIFFUSERS_PREFIX = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
LYCORIS = re.compile(r"\.(hada_|lokr_|oft_|boft_|dora_scale|w_norm|b_norm|diff\b|diff_b\b)")
SUFFIXES = {
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    "_lora.down.weight": "down",  # old diffusers attention processors: ...processor.to_q_lora.down
    "_lora.up.weight": "up",
    ".alpha": "alpha",
}


class LoraFormatError(ValueError):
    """A file that is not a LoRA this service can apply (the message says why)."""


@dataclass
class LoraWeight:
    """One adapted layer: ``delta(x) = up(down(x)) * scale`` (linear, or conv then 1x1 conv)."""

    down: Tensor
    up: Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank


def flat(path: str) -> str:
    return path.replace(".", "_")


def _split(key: str) -> tuple[str, str, str] | None:
    """(component, flat module path, part) of one state-dict key; None for keys that are not LoRA."""
    suffix = next((x for x in SUFFIXES if key.endswith(x)), None)
    if suffix is None:
        return None
    part, stem = SUFFIXES[suffix], key[: -len(suffix)].replace(".processor.", ".")
    for prefix, comp in {**KOHYA_PREFIX, **DIFFUSERS_PREFIX}.items():
        if stem.startswith(prefix):
            module = stem[len(prefix) :]
            module = re.sub(r"\.to_out$", ".to_out.0", module)  # old processor name of to_out.0
            return comp, flat(module), part
    return None


def parse_state_dict(state: dict[str, Tensor], where: str) -> tuple[dict[str, dict[str, LoraWeight]], str]:
    """The layers of a LoRA state dict by component and flat module path, and its format name."""
    bad = next((k for k in state if LYCORIS.search(k)), None)
    if bad is not None:
        raise LoraFormatError(
            f"{where}: LyCORIS adapters (LoHa, LoKr, ...) are not supported, only plain LoRA (found {bad!r})"
        )
    parts: dict[tuple[str, str], dict[str, Tensor]] = {}
    kinds = set()
    for key, value in state.items():
        split = _split(key)
        if split is None:
            continue
        kinds.add("kohya" if key.startswith("lora_") else "diffusers")
        comp, module, part = split
        parts.setdefault((comp, module), {})[part] = value
    if not parts:
        raise LoraFormatError(f"{where}: no LoRA layers found (expected kohya or diffusers/PEFT keys)")
    out: dict[str, dict[str, LoraWeight]] = {}
    for (comp, module), p in parts.items():
        if "down" not in p or "up" not in p:
            raise LoraFormatError(f"{where}: layer {module!r} of {comp} lacks its down or up matrix")
        down, up = p["down"].float(), p["up"].float()
        if up.shape[1] != down.shape[0]:
            raise LoraFormatError(
                f"{where}: layer {module!r}: up {tuple(up.shape)} vs down {tuple(down.shape)}"
            )
        alpha = float(p["alpha"]) if "alpha" in p else None
        out.setdefault(comp, {})[module] = LoraWeight(down, up, alpha)
    return out, "+".join(sorted(kinds))


def read_lora(path: Path) -> tuple[dict[str, dict[str, LoraWeight]], str, dict[str, str]]:
    """A LoRA file's layers, its format, and its metadata (e.g. ``ss_base_model_version``)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iteration)
    except Exception as exc:
        raise LoraFormatError(f"{path.name}: not a readable .safetensors file: {exc}") from exc
    layers, fmt = parse_state_dict(state, path.name)
    return layers, fmt, meta

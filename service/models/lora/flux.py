"""Flux LoRA files in the layouts people share, rewritten into diffusers / PEFT keys
(``transformer.<diffusers FluxTransformer2DModel path>.lora_A.weight`` / ``.lora_B.weight`` /
``.alpha``) that :func:`.formats.parse_state_dict` reads like any other.

- kohya sd-scripts (``networks/lora_flux.py``): ``lora_unet_double_blocks_0_img_attn_qkv``,
  ``..._img_attn_proj``, ``..._img_mlp_0``, ``..._img_mod_lin``, ``lora_unet_single_blocks_0_linear1``,
  ``..._linear2``, ``..._modulation_lin`` (BFL's module names, dots as underscores) with
  ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``; CLIP-L layers ``lora_te1_`` as for SD.
- BFL names with dots, as ComfyUI / OneTrainer / ai-toolkit's "comfy" exports write them:
  ``[diffusion_model.]double_blocks.0.img_attn.qkv.lora_A.weight`` (or ``.lora_down.weight``).
- XLabs (x-flux): ``double_blocks.0.processor.qkv_lora1.down.weight`` (image stream; ``_lora2``: text),
  ``proj_lora1`` / ``proj_lora2``, ``single_blocks.0.processor.qkv_lora`` / ``proj_lora``; no alpha.
- diffusers names: ai-toolkit / diffusers' trainers (``transformer.transformer_blocks.0.attn.to_q.lora_A
  .weight``, read as they are) and kohya-style flat ones (``lora_transformer_single_transformer_blocks_0_
  attn_to_q.lora_down.weight``).

BFL fuses what diffusers keeps apart: a fused layer's LoRA (one down, one up) becomes one LoRA per
diffusers layer with the same down and alpha and that layer's rows of the up matrix (``qkv`` -> q, k, v;
a single block's ``linear1`` -> q, k, v and the MLP input, widths 1:1:1:4), which is the same update.
The final layer's modulation is (shift, scale) where diffusers has (scale, shift): its up rows swap.
BFL's Control LoRAs (FLUX.1 Canny / Depth: full ``.scale`` / ``.bias`` weights and a wider ``img_in``)
change the model itself and are refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from service.models.flux_keys import DOUBLE, EMBEDDERS

from .formats import LoraFormatError, flat

STREAM_QKV = {"img": ("to_q", "to_k", "to_v"), "txt": ("add_q_proj", "add_k_proj", "add_v_proj")}
TOP = {"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out"}
for _a, _b in EMBEDDERS.items():
    TOP |= {f"{_a}.in_layer": f"{_b}.linear_1", f"{_a}.out_layer": f"{_b}.linear_2"}
SINGLE = {"linear2": "proj_out", "modulation.lin": "norm.linear"}
FINAL_MOD = "final_layer.adaLN_modulation.1"
# A BFL module name without its block prefix, by its flat (kohya) spelling.
INNER = {flat(n): n for n in [*DOUBLE, "img_attn.qkv", "txt_attn.qkv", *SINGLE, "linear1"]}
TOP_FLAT = {flat(n): n for n in [*TOP, FINAL_MOD]}
XLABS = {"qkv_lora1": "img_attn.qkv", "proj_lora1": "img_attn.proj", "qkv_lora2": "txt_attn.qkv",
         "proj_lora2": "txt_attn.proj", "qkv_lora": "qkv", "proj_lora": "linear2"}  # fmt: skip
PARTS = ((".lora_down.weight", "lora_A"), (".lora_up.weight", "lora_B"), (".lora_A.weight", "lora_A"),
         (".lora_B.weight", "lora_B"), (".down.weight", "lora_A"), (".up.weight", "lora_B"),
         (".alpha", "alpha"))  # fmt: skip
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "lora_unet_")
BLOCK = re.compile(r"(double_blocks|single_blocks)[._](\d+)[._](.+)")


def is_flux(keys: list[str]) -> bool:
    """Whether a LoRA's keys are Flux's in a layout other than diffusers' own (BFL, kohya, XLabs)."""
    bfl = re.compile(r"(^|[._])(double|single)_blocks[._]\d")
    return any(bfl.search(k) or k.startswith("lora_transformer_") for k in keys)


def _split(key: str) -> tuple[str, str] | None:
    """(module as the file names it, part) of one key; None: not one of a LoRA's parts."""
    for suffix, part in PARTS:
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def block_match(
    module: str, prefixes: tuple[str, ...], block: re.Pattern[str]
) -> tuple[str, re.Match[str] | None]:
    """A file's module name without the tools' prefixes, and its match as a block's layer (or None)."""
    for p in prefixes:
        module = module.removeprefix(p)
    return module, block.fullmatch(module)


def _bfl(module: str) -> str | None:
    """A BFL module name (dotted) for a file's module name in BFL's, kohya's or XLabs' spelling."""
    module, m = block_match(module, PREFIXES, BLOCK)
    if m is None:
        return TOP_FLAT.get(flat(module))
    kind, i, rest = m.group(1), m.group(2), m.group(3)
    if rest.startswith("processor."):  # XLabs
        name = XLABS.get(rest.removeprefix("processor."))
        if name is None or (kind == "double_blocks") != name.startswith(("img", "txt")):
            return None
    else:
        name = INNER.get(flat(rest))
    return None if name is None else f"{kind}.{i}.{name}"


def _targets(bfl: str, rows: int) -> list[tuple[str, int]] | None:
    """The diffusers layers a BFL module's LoRA update goes to, with how many rows of ``up`` each takes."""
    if bfl in TOP:
        return [(TOP[bfl], rows)]
    if bfl == FINAL_MOD:
        return [("norm_out.linear", rows)]
    kind, i, name = bfl.split(".", 2)
    if kind == "double_blocks":
        b = f"transformer_blocks.{i}."
        if name.endswith("attn.qkv"):
            return [(f"{b}attn.{q}", rows // 3) for q in STREAM_QKV[name[:3]]]
        return [(b + DOUBLE[name], rows)] if name in DOUBLE else None
    b = f"single_transformer_blocks.{i}."
    if name == "qkv":  # XLabs: the attention's q, k, v only
        return [(f"{b}attn.to_{q}", rows // 3) for q in "qkv"]
    if name == "linear1":  # [q; k; v; mlp in], the MLP 4x as wide
        inner = rows // 7
        return [(f"{b}attn.to_q", inner), (f"{b}attn.to_k", inner), (f"{b}attn.to_v", inner),
                (f"{b}proj_mlp", rows - 3 * inner)]  # fmt: skip
    return [(b + SINGLE[name], rows)] if name in SINGLE else None


@dataclass(frozen=True)
class Layout:
    """How one family's original module names become diffusers layers (Flux here, SD3 in :mod:`.sd3`)."""

    label: str
    name: Callable[[str], str | None]  # a file's module name -> the original (dotted) name, or None
    targets: Callable[[str, Tensor, Tensor], list[tuple[str, int]] | None]  # (name, down, up)
    swapped: Callable[[str, Tensor, Tensor], bool]  # whether the up rows are (shift, scale) halves
    full_weights: str  # why full weights next to the LoRA's are refused


FLUX = Layout(
    "Flux",
    _bfl,
    lambda name, down, up: _targets(name, int(up.shape[0])),
    lambda name, down, up: name == FINAL_MOD,
    "BFL's FLUX.1 Canny / Depth Control LoRAs change the model itself",
)


def to_diffusers(state: dict[str, Tensor], where: str, layout: Layout = FLUX) -> dict[str, Tensor]:
    """A LoRA state dict in PEFT keys (``transformer.<path>``); text-encoder keys kept as they are."""
    groups: dict[str, dict[str, tuple[str, Tensor]]] = {}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith(("lora_te", "text_encoder")):
            out[key] = value
            continue
        split = _split(key)
        if key.startswith("lora_transformer_") and split is not None:  # diffusers' names, flat
            part = split[1] if split[1] == "alpha" else f"{split[1]}.weight"
            out[f"transformer.{split[0].removeprefix('lora_transformer_')}.{part}"] = value
            continue
        if split is None and re.search(r"\.(scale|bias|weight)$", key):
            raise LoraFormatError(
                f"{where}: key {key!r}: full weights in a {layout.label} LoRA ({layout.full_weights}) "
                "are not supported, only LoRA updates"
            )
        name = None if split is None else layout.name(split[0])
        if split is None or name is None:
            if key.startswith("transformer."):  # already diffusers' own names
                out[key] = value
                continue
            raise LoraFormatError(f"{where}: key {key!r} is no {layout.label} LoRA layer this service reads")
        groups.setdefault(name, {})[split[1]] = (key, value)
    for name, parts in groups.items():
        if "lora_A" not in parts or "lora_B" not in parts:
            raise LoraFormatError(f"{where}: {layout.label} layer {name!r} lacks its down or up matrix")
        down, up = parts["lora_A"][1], parts["lora_B"][1]
        targets = layout.targets(name, down, up)
        if targets is None:
            raise LoraFormatError(f"{where}: key {parts['lora_A'][0]!r}: no such {layout.label} layer")
        if layout.swapped(name, down, up):
            a, b = up.chunk(2, dim=0)
            up = torch.cat([b, a], dim=0)
        start = 0
        for target, n in targets:
            out[f"transformer.{target}.lora_A.weight"] = down
            out[f"transformer.{target}.lora_B.weight"] = up[start : start + n]
            start += n
            if "alpha" in parts:
                out[f"transformer.{target}.alpha"] = parts["alpha"][1]
    return out

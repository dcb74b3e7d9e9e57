"""Upscaler files -> a runnable :class:`Net`: read the state dict safely, unwrap it as spandrel does,
detect the architecture from its keys, refuse architectures under a non-commercial licence."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from . import compact, dat, esrgan, hat, omnisr, span, swinir
from .nets import ArchError, Net, StateDict

EXTENSIONS = (".safetensors", ".pth", ".pt", ".ckpt")

# The containers training scripts save the weights under (basicsr: params_ema / params), in the order
# spandrel unwraps them; then one remaining single dict entry; then a common "module." / "netG." prefix.
_WRAPPERS = ("model_state_dict", "state_dict", "params_ema", "params-ema", "params", "model", "net")
_PREFIXES = ("module.", "netG.")

# Architectures we run: (detect, load), in the order they are tried (spandrel's order for these).
ARCHES: list[tuple[str, Callable[[StateDict], bool], Callable[[StateDict], Net]]] = [
    ("ESRGAN", esrgan.detect, esrgan.load),
    ("SPAN", span.detect, span.load),
    ("HAT", hat.detect, hat.load),
    ("SwinIR", swinir.detect, swinir.load),
    ("Compact", compact.detect, compact.load),
    ("DAT", dat.detect, dat.load),
    ("OmniSR", omnisr.detect, omnisr.load),
]

# Architectures whose published code is under a non-commercial licence (spandrel keeps them out of its
# MIT package, in spandrel_extra_arches), each by keys its files always have (from spandrel's detection).
NONCOMMERCIAL: dict[str, tuple[str, ...]] = {
    "SRFormer": (
        "layers.0.residual_group.blocks.0.attn.aligned_relative_position_index",
        "conv_first.weight",
    ),
    "CodeFormer": ("position_emb", "idx_pred_layer.1.weight", "quantize.embedding.weight"),
    "MAT": ("synthesis.first_stage.conv_first.conv.resample_filter",),
    "DDColor": ("refine_net.0.0.weight_orig", "encoder.arch.downsample_layers.0.0.weight"),
    "AdaCode": (
        "multiscale_encoder.in_conv.weight",
        "weight_predictor.blocks.0.swin_blks.0.residual_group.blocks.0.norm1.weight",
    ),
    "FeMaSR": (
        "multiscale_encoder.in_conv.weight",
        "quantize_group.0.embedding.weight",
        "after_quant_group.0.conv.weight",
    ),
    "M3SNet": ("intro.weight", "encoders.0.0.beta", "middle_blks.0.temperature"),
    "Restormer": (
        "patch_embed.proj.weight",
        "encoder_level1.0.attn.temperature",
        "refinement.0.attn.temperature",
    ),
    "MPRNet": ("shallow_feat1.0.weight", "sam12.conv1.weight", "stage3_orsnet.orb1.body.0.body.0.weight"),
    "MIRNet2": ("conv_in.weight", "body.0.body.0.dau_top.body.0.weight", "conv_out.weight"),
}


class FileError(ValueError):
    """An upscaler file that cannot be used; the message says why (the caller names the file)."""


class NonCommercial(FileError):
    """A recognised architecture under a non-commercial licence, not opted in."""


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """The file's tensors by key, unwrapped. ``.pth`` files are read with ``weights_only`` (no code runs)."""
    try:
        if path.suffix == ".safetensors":
            raw: Any = load_file(str(path), device="cpu")
        else:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated zip, a pickle with code, random bytes: all "not readable"
        raise FileError(f"not a readable {path.suffix} file ({_why(exc)})") from exc
    return canonical(raw)


def canonical(raw: Any) -> dict[str, Tensor]:
    if not isinstance(raw, Mapping):
        raise FileError(f"holds a {type(raw).__name__}, not a state dict")
    for key in _WRAPPERS:
        if isinstance(raw.get(key), Mapping):
            raw = raw[key]
            break
    if len(raw) == 1 and isinstance(next(iter(raw.values())), Mapping):
        raw = next(iter(raw.values()))
    state = {str(k): v for k, v in raw.items() if isinstance(v, Tensor)}
    if not state:
        raise FileError("holds no tensors")
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def noncommercial_arch(state: StateDict) -> str | None:
    for arch, keys in NONCOMMERCIAL.items():
        if all(k in state for k in keys):
            return arch
    return None


def build(state: StateDict, allow_noncommercial: bool) -> Net:
    """The net the keys describe. Raises :class:`FileError` (or :class:`NonCommercial`) saying why not."""
    nc = noncommercial_arch(state)
    if nc is not None:
        if not allow_noncommercial:
            raise NonCommercial(
                f"architecture {nc} is under a non-commercial licence; the operator may allow such "
                "files with KDIFF_UPSCALER_NONCOMMERCIAL=true"
            )
        raise FileError(f"architecture {nc} (non-commercial, allowed) is not implemented here")
    for name, detect, load in ARCHES:
        if detect(state):
            try:
                return probe(load(state))
            except ArchError as exc:
                raise FileError(f"looks like {name} but {exc}") from exc
            except (KeyError, IndexError, RuntimeError, ValueError) as exc:
                raise FileError(f"looks like {name} but cannot be read as one ({_why(exc)})") from exc
    sample = ", ".join(sorted(state)[:4])
    raise FileError(
        f"no supported architecture matches its keys ({len(state)} keys: {sample}, ...); "
        f"supported: {', '.join(n for n, _, _ in ARCHES)}"
    )


def probe(net: Net) -> Net:
    """One tiny forward pass: weights whose shapes do not chain (a corrupt or hand-edited file) fail
    here, at load, naming the file, instead of inside a batched call that other requests share."""
    with torch.inference_mode():
        out = net.forward(torch.zeros(1, 3, 8, 8))
    if tuple(out.shape) != (1, 3, 8 * net.scale, 8 * net.scale):
        raise ArchError(
            f"gives {tuple(out.shape)} for a 1x3x8x8 input; expected {8 * net.scale}x{8 * net.scale}"
        )
    return net


def load_net(path: Path, allow_noncommercial: bool) -> Net:
    return build(read_state_dict(path), allow_noncommercial)


def _why(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."

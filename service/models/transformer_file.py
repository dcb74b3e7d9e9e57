"""A diffusion transformer's weights out of one ``.safetensors`` file as people share them.

Used for SD / SDXL checkpoints too (:func:`read_weights`): diffusers' single-file loaders ignore the
scales and would load the stored fp8 values as the weights.

- All-in-one checkpoints (ComfyUI's "checkpoint" saves, e.g. Comfy-Org's ``flux1-dev-fp8``,
  ``sd3_medium_incl_clips``): the transformer under ``model.diffusion_model.``, the VAE under
  ``vae.`` / ``first_stage_model.`` and text encoders under ``text_encoders.``; only the
  transformer's keys are read (the rest come from the config folder and would cost memory).
- fp8 weights (``float8_e4m3fn`` / ``float8_e5m2``, e.g. ``flux1-dev-fp8``): read as they are; the
  model casts them to its dtype.
- ComfyUI's scaled fp8 (``*_fp8_scaled``: a ``scaled_fp8`` marker key and a ``<layer>.scale_weight``
  scalar per layer, optionally ``<layer>.scale_input``) and its newer per-layer quantization
  (``<layer>.comfy_quant`` = JSON ``{"format": "float8_e4m3fn"}`` with a ``<layer>.weight_scale``):
  the real weight is the stored fp8 weight times its scale, so the weight is multiplied out here
  (``scale_input`` only scales activations for fp8 matmuls: not needed once the weight is
  dequantized). Any other format (nvfp4, int8, bitsandbytes nf4) is refused naming it: loading its
  packed bytes as weights would give noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from service.models.sd_loader import SDLoadError

PREFIX = "model.diffusion_model."
FP8 = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
DEQUANT_DTYPE = torch.bfloat16  # a multiplied-out fp8 weight keeps its precision in bf16
# Keys of quantization formats we do not dequantize (what writes them: bitsandbytes / ComfyUI).
REFUSED = {
    ".absmax": "bitsandbytes nf4 / fp4",
    ".quant_map": "bitsandbytes nf4 / fp4",
    ".quant_state.": "bitsandbytes nf4 / fp4",
    ".weight_scale_2": "nvfp4",
}


def _scale(f: object, key: str, where: str) -> Tensor:
    s = f.get_tensor(key).float()  # type: ignore[attr-defined]
    if s.numel() != 1 or not bool(torch.isfinite(s).all()):
        raise SDLoadError(f"{where}: {key} is not one finite scale (per-tensor fp8 scales only)")
    return s.reshape(())


def _format(f: object, key: str, where: str) -> str:
    raw = f.get_tensor(key)  # type: ignore[attr-defined]
    try:
        conf = json.loads(bytes(raw.to(torch.uint8).tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise SDLoadError(f"{where}: {key} is not ComfyUI's JSON quantization config ({exc})") from exc
    fmt = conf.get("format") if isinstance(conf, dict) else conf
    return str(fmt)


def read_transformer(path: Path) -> dict[str, Tensor]:
    """The transformer's tensors of a single file (keys as the file has them, ``model.diffusion_model.``
    kept where present), fp8-scaled layers multiplied out. SDLoadError names the file and the reason."""
    return read_weights(path, transformer_only=True)


def read_weights(
    path: Path, *, transformer_only: bool = False, where: str | None = None
) -> dict[str, Tensor]:
    """Every tensor of a ``.safetensors`` checkpoint (``transformer_only``: those under
    ``model.diffusion_model.`` when it has any), fp8-scaled layers multiplied out."""
    from safetensors import safe_open

    where = where or path.name
    try:
        f = safe_open(str(path), framework="pt")
    except Exception as exc:
        raise SDLoadError(f"{where}: not a readable safetensors file ({exc})") from exc
    with f:
        keys = list(f.keys())  # noqa: SIM118 (safe_open has no iteration)
        prefixed = [k for k in keys if k.startswith(PREFIX)] if transformer_only else []
        keys = prefixed or keys  # an all-in-one checkpoint: the transformer's keys only
        for k in keys:
            what = next((w for s, w in REFUSED.items() if s in k), None)
            if what is not None:
                raise SDLoadError(
                    f"{where}: {what} quantized weights (key {k!r}) are not supported; "
                    "use a bf16, fp16 or fp8 file"
                )
        names = set(keys)
        scales: dict[str, str] = {}  # weight key -> its scale key
        skip: set[str] = set()
        for k in keys:
            if k.endswith("scaled_fp8"):  # the marker of ComfyUI's scaled fp8 files
                skip.add(k)
            elif k.endswith((".scale_weight", ".weight_scale")):
                stem = k.rsplit(".", 1)[0]
                scales[stem + ".weight"] = k
                skip.add(k)
            elif k.endswith((".scale_input", ".input_scale")):
                skip.add(k)
            elif k.endswith(".comfy_quant"):
                fmt = _format(f, k, where)
                if fmt not in FP8:
                    raise SDLoadError(
                        f"{where}: {k}: ComfyUI quantization format {fmt!r} is not supported "
                        f"(only {', '.join(FP8)}); use a bf16, fp16 or fp8 file"
                    )
                skip.add(k)
        out: dict[str, Tensor] = {}
        for k in keys:
            if k in skip:
                continue
            t = f.get_tensor(k)
            if k in scales:
                t = (t.float() * _scale(f, scales[k], where)).to(DEQUANT_DTYPE)
            out[k] = t
        orphan = sorted(w for w in scales if w not in names)
        if orphan:
            raise SDLoadError(f"{where}: scales without their weight: {orphan[:4]}")
    return out

"""SD3 / SD3.5 and Flux transformers from GGUF files as city96's ComfyUI-GGUF releases them.

Those files (``flux1-dev-Q8_0.gguf``, ``flux1-schnell-Q4_K_S.gguf``, ``sd3.5_large-Q5_0.gguf``)
hold the original checkpoint's tensors under their original names (``double_blocks.0.img_attn.qkv
.weight``; a ``model.diffusion_model.`` prefix, when present, is dropped) and name the model in
``general.architecture`` (``flux`` / ``sd3``; files without it, as stable-diffusion.cpp writes
them, are recognised by their keys). Weights keep their ggml type in memory (:class:`QLinear`
dequantizes per call); 1-dim tensors (biases, norms) and non-linear weights are dequantized at
load. The transformer is built on the meta device, so the float weights are never allocated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from service.models.quant.ggml import dequantize
from service.models.quant.gguf_file import GGUFError, check_types, orig_shape, read_header, read_tensor
from service.models.quant.qtensor import QTensor, load_quantized

PREFIX = "model.diffusion_model."
ARCHS = ("flux", "sd3")  # what this service builds from a GGUF transformer
# Keys that tell an architecture apart when the file does not name it (stable-diffusion.cpp).
ARCH_KEYS = {"double_blocks.0.img_attn.proj.weight": "flux", "joint_blocks.0.x_block.attn.qkv.weight": "sd3"}


def read_state_dict(path: Path) -> tuple[str, dict[str, Any]]:
    """(architecture, {original key: QTensor or float tensor}) of a GGUF diffusion model file."""
    header = read_header(path)
    names = {t.name.removeprefix(PREFIX) for t in header.tensors}
    arch = header.arch or next((a for k, a in ARCH_KEYS.items() if k in names), None)
    if arch not in ARCHS:
        raise GGUFError(
            f"{path.name}: GGUF architecture {arch or 'unknown'!r}; this service loads GGUF "
            f"transformers of {', '.join(ARCHS)}"
        )
    check_types(header)
    prefixed = any(t.name.startswith(PREFIX) for t in header.tensors)
    sd: dict[str, Any] = {}
    with path.open("rb") as f:
        for info in header.tensors:
            if prefixed and not info.name.startswith(PREFIX):
                continue  # a full checkpoint's VAE / text encoders: not the transformer
            raw, qtype = read_tensor(f, header, info)
            shape = orig_shape(header, info.name)
            key = info.name.removeprefix(PREFIX)
            if shape is None and len(info.shape) >= 2:
                sd[key] = QTensor(raw, qtype, info.shape)
            else:  # small or reshaped by the converter: plain floats (F32 kept exact)
                value = dequantize(raw, qtype, _float_dtype(qtype.name))
                sd[key] = value.reshape(shape or info.shape)
    return arch, sd


def _float_dtype(name: str) -> torch.dtype:
    """F16 / BF16 stay in their dtype; F32 and the block types become float32."""
    return {"F16": torch.float16, "BF16": torch.bfloat16}.get(name, torch.float32)


def load_transformer(cls: Any, path: Path, config: Path, family: str) -> Any:
    """The diffusers transformer ``cls`` (config from ``config/transformer``) with the GGUF's weights."""
    arch, sd = read_state_dict(path)
    if arch != family:
        raise GGUFError(f"{path.name}: a GGUF {arch} transformer, but the manifest's kind is {family}")
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(str(config / "transformer")))
    if arch == "flux":
        from service.models.flux_keys import flux_to_diffusers

        inner = int(model.config.num_attention_heads) * int(model.config.attention_head_dim)
        sd = flux_to_diffusers(sd, inner, int(inner * 4.0))
    else:
        from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

        sd = convert_sd3_transformer_checkpoint_to_diffusers(sd)
    return load_quantized(model, sd, path.name).eval()

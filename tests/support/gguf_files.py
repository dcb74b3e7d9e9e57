"""GGUF transformer files as city96's ComfyUI-GGUF releases them, written with gguf-py's GGUFWriter.

city96's ``tools/convert.py`` writes the original checkpoint's keys (Flux: ``double_blocks.*``;
SD3: ``joint_blocks.*``, ``model.diffusion_model.`` dropped), ``general.architecture`` (flux /
sd3), ``general.quantization_version`` and ``general.file_type``; 1-dim and tiny tensors (<= 1024
values) stay F32; llama.cpp's quantizer then gives the rest the target type, falling back to a
32-value type (or F16) for rows that are not a whole number of 256-value blocks. Block types
gguf-py can quantize (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, BF16, F16) are its real output; the K-quants,
which gguf-py only reads, are valid random blocks (finite, moderate scales). The reference a test
compares with is gguf-py's numpy ``dequantize`` of the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from torch import Tensor

KQUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # llama.cpp's
# (start byte, scale) of each half-float field in a block, and the scale that keeps weights ~0.05
HALVES = {
    "Q2_K": [(80, 2e-3), (82, 2e-3)],
    "Q3_K": [(108, 4e-4)],
    "Q4_K": [(0, 1e-4), (2, 1e-4)],
    "Q5_K": [(0, 5e-5), (2, 5e-5)],
    "Q6_K": [(208, 5e-6)],
}


def random_blocks(name: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Valid ``name`` blocks for a [rows, cols] tensor: random bytes, finite scales."""
    block, nbytes = gguf.GGML_QUANT_SIZES[T[name]]
    raw = rng.integers(0, 256, (rows * cols // block, nbytes), dtype=np.uint8)
    for at, scale in HALVES[name]:
        d = (scale * rng.uniform(0.5, 1.5, raw.shape[0])).astype(np.float16)
        raw[:, at : at + 2] = d.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def pick_type(name: str, value: np.ndarray, want: str) -> str:
    """The type city96's pipeline gives ``name``: F32 for 1-dim / tiny tensors, else ``want`` or its
    fallback when the rows are not whole blocks."""
    if value.ndim == 1 or value.size <= 1024:
        return "F32"
    for t in (want, FALLBACK.get(want, want), "F16"):
        if value.shape[-1] % gguf.GGML_QUANT_SIZES[T[t]][0] == 0:
            return t
    return "F16"


def write_gguf(
    path: Path, sd: dict[str, Tensor], want: str, arch: str, seed: int = 0
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Write ``sd`` (original keys) as a ``want`` GGUF; returns (the weights the file holds, dequantized
    by gguf-py: the reference; each key's type)."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    ref: dict[str, Tensor] = {}
    types: dict[str, str] = {}
    for key, tensor in sd.items():
        value = tensor.detach().float().numpy()
        t = pick_type(key, value, want)
        if t in KQUANTS:
            data = random_blocks(t, int(np.prod(value.shape[:-1])), value.shape[-1], rng)
        else:
            data = gguf.quants.quantize(value.reshape(-1, value.shape[-1]), T[t])
        writer.add_tensor(key, data.reshape(*value.shape[:-1], -1), raw_dtype=T[t])
        back = gguf.quants.dequantize(data, T[t]).astype(np.float32).reshape(value.shape)
        ref[key], types[key] = torch.from_numpy(back.copy()), t
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return ref, types

"""GGUF transformer files as city96's ComfyUI-GGUF releases them, written with gguf-py's GGUFWriter.

city96's ``tools/convert.py`` writes the original checkpoint's keys (Flux: ``double_blocks.*``;
SD3: ``joint_blocks.*``, ``model.diffusion_model.`` dropped), ``general.architecture`` (flux /
sd3), ``general.quantization_version`` and ``general.file_type``, with 1-dim and tiny tensors
(<= 1024 values) in F32 and the rest in F16 (BF16 from a bf16 source). His patched llama.cpp
quantizer (``tools/lcpp.patch``) then gives 2-dim tensors the target type except the embedders and
final layers it names (``UNQUANTIZED``), and F16 to rows that are not whole blocks. Block types
gguf-py can quantize (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, BF16, F16) are its real output; the K-quants,
which gguf-py only reads, are valid random blocks (finite, moderate scales). The reference a test
compares with is gguf-py's numpy ``dequantize`` of the same bytes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from torch import Tensor

KQUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# name parts lcpp.patch leaves unquantized, by architecture
UNQUANTIZED = {
    "flux": ("txt_in.", "img_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer."),
    "sd3": ("final_layer.", "time_text_embed.", "context_embedder.", "t_embedder.", "y_embedder.",
            "x_embedder.", "proj_out.weight", "pos_embed"),
}  # fmt: skip
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


def pick_type(name: str, value: np.ndarray, want: str, arch: str) -> str:
    """The type city96's pipeline gives ``name``: F32 for 1-dim / tiny tensors, F16 for what the
    quantizer skips (other than 2-dim, named in UNQUANTIZED, rows that are not whole blocks), else
    ``want``."""
    if value.ndim == 1 or value.size <= 1024:
        return "F32"
    base = "BF16" if want == "BF16" else "F16"
    if value.ndim != 2 or any(part in name for part in UNQUANTIZED.get(arch, ())):
        return base
    return want if value.shape[-1] % gguf.GGML_QUANT_SIZES[T[want]][0] == 0 else base


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
        t = pick_type(key, value, want, arch)
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


def flux_folder(root: Path, name: str, weights: str, cfg: dict[str, Any]) -> Path:
    """A Flux model folder of the tiny store's text encoders and VAE, its transformer config ``cfg``
    (diffusers' FluxTransformer2DModel arguments) and the manifest naming ``weights`` (a .gguf or a
    .safetensors file the caller writes there), as a city96 user's folder is laid out."""
    from diffusers import FluxTransformer2DModel

    from tests.support.flow_tiny import tiny_flow_store, write_manifest

    folder = root / name
    shutil.copytree(tiny_flow_store() / "flux_dev", folder / "config")
    shutil.rmtree(folder / "config" / "transformer")
    with torch.device("meta"):
        FluxTransformer2DModel(**cfg).save_config(str(folder / "config" / "transformer"))
    write_manifest(folder, "flux", cfg_scale=1.0, guidance=3.5)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "weights": weights, "config": "config"}))
    return folder

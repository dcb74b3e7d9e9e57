"""SD3 / SD3.5 LoRAs in the original MMDiT names, as kohya sd-scripts (``networks/lora_sd3.py``) and
ComfyUI-style exports write them: ``lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight``
(or dotted, ``diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_A.weight``), rewritten into the
diffusers ``SD3Transformer2DModel``'s layers by :func:`.flux.to_diffusers`.

The map is the single-file converter's (service/models/flow_loader.py reads those files through
diffusers): ``x_block`` is the image stream (``attn.qkv`` -> ``to_q`` / ``to_k`` / ``to_v``,
``attn.proj`` -> ``to_out.0``, ``mlp.fc1`` / ``fc2`` -> ``ff.net.0.proj`` / ``ff.net.2``,
``adaLN_modulation.1`` -> ``norm1.linear``; SD3.5 Medium's ``attn2``), ``context_block`` the text
stream (``add_*_proj``, ``to_add_out``, ``ff_context``, ``norm1_context``). The last block's text
stream only modulates (shift, scale: 2 x its width rows, where the others have 6) and, like the final
layer, has them in the other order in diffusers: its up rows swap halves.
"""

from __future__ import annotations

import re

from torch import Tensor

from .flux import Layout, block_match
from .formats import flat

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "lora_unet_")
BLOCK = re.compile(r"joint_blocks[._](\d+)[._](x_block|context_block)[._](.+)")
STREAM = {
    "x_block": {"attn.proj": "attn.to_out.0", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2",
                "adaLN_modulation.1": "norm1.linear", "attn2.proj": "attn2.to_out.0"},
    "context_block": {"attn.proj": "attn.to_add_out", "mlp.fc1": "ff_context.net.0.proj",
                      "mlp.fc2": "ff_context.net.2", "adaLN_modulation.1": "norm1_context.linear"},
}  # fmt: skip
QKV = {("x_block", "attn.qkv"): ("attn.to_q", "attn.to_k", "attn.to_v"),
       ("x_block", "attn2.qkv"): ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
       ("context_block", "attn.qkv"): ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}  # fmt: skip
INNER = {flat(n): n for names in STREAM.values() for n in names}
INNER |= {"attn_qkv": "attn.qkv", "attn2_qkv": "attn2.qkv"}
TOP = {"context_embedder": "context_embedder", "x_embedder.proj": "pos_embed.proj",
       "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
       "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
       "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
       "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
       "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear"}  # fmt: skip
TOP_FLAT = {flat(n): n for n in TOP}


def is_sd3(keys: list[str]) -> bool:
    """Whether a LoRA's keys name SD3's original MMDiT modules."""
    return any(BLOCK.search(k) for k in keys)


def _name(module: str) -> str | None:
    module, m = block_match(module, PREFIXES, BLOCK)
    if m is None:
        return TOP_FLAT.get(flat(module))
    inner = INNER.get(flat(m.group(3)))
    return None if inner is None else f"joint_blocks.{m.group(1)}.{m.group(2)}.{inner}"


def _last_context(name: str, down: Tensor, up: Tensor) -> bool:
    """The last block's text-stream modulation: (shift, scale) only, 2 x its input width rows."""
    return name.endswith("context_block.adaLN_modulation.1") and up.shape[0] == 2 * down.shape[1]


def _targets(name: str, down: Tensor, up: Tensor) -> list[tuple[str, int]] | None:
    rows = int(up.shape[0])
    if name in TOP:
        return [(TOP[name], rows)]
    _, i, stream, inner = name.split(".", 3)
    b = f"transformer_blocks.{i}."
    if (stream, inner) in QKV:
        return [(b + t, rows // 3) for t in QKV[(stream, inner)]]
    if _last_context(name, down, up):
        return [(f"{b}norm1_context.linear", rows)]
    target = STREAM[stream].get(inner)
    return None if target is None else [(b + target, rows)]


SD3 = Layout(
    "SD3",
    _name,
    _targets,
    lambda name, down, up: name == "final_layer.adaLN_modulation.1" or _last_context(name, down, up),
    "not a LoRA",
)

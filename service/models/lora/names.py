"""Matching a LoRA file's layer names to a model's own modules, whatever naming the file uses.

Names are compared "flat" (dots as underscores). Two spellings need more than that:

- CLIP text encoders: files name ``text_model_encoder_layers_0_mlp_fc1`` (transformers 4 laid
  ``CLIPTextModel`` out as ``text_model.encoder...``); transformers 5's ``CLIPTextModel`` has no
  ``text_model`` level while ``CLIPTextModelWithProjection`` still has one. Both sides drop a
  leading ``text_model_``, so either layout matches either spelling.
- UNets in the original (CompVis / SGM) layout, as kohya names SDXL LoRAs: ``input_blocks_<i>_<j>``,
  ``middle_block_<j>``, ``output_blocks_<i>_<j>`` and the ResBlock's ``in_layers_2`` / ``emb_layers_1``
  / ``out_layers_3`` / ``skip_connection``, ``op`` (downsample), ``conv`` (upsample). The block
  numbering follows from ``layers_per_block``: input block ``i > 0`` is level ``(i - 1) // (n + 1)``,
  item ``(i - 1) % (n + 1)`` (item ``n``: the level's downsampler); output block ``i`` is up level
  ``i // (n + 1)``, resnet ``i % (n + 1)``, with the level's attention at ``_1`` and its upsampler
  last (``_1_conv`` in a level without attention, ``_2_conv`` with one).
"""

from __future__ import annotations

import re

TEXT_LEVEL = "text_model_"
RESNET = {"in_layers_2": "conv1", "emb_layers_1": "time_emb_proj", "out_layers_3": "conv2",
          "skip_connection": "conv_shortcut"}  # fmt: skip
TOP = {"time_embed_0": "time_embedding_linear_1", "time_embed_2": "time_embedding_linear_2",
       "label_emb_0_0": "add_embedding_linear_1", "label_emb_0_2": "add_embedding_linear_2",
       "input_blocks_0_0": "conv_in", "out_2": "conv_out"}  # fmt: skip
BLOCK = re.compile(r"(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)")
MIDDLE = re.compile(r"middle_block_(\d)_(.+)")
MIDDLE_PARTS = ("resnets_0", "attentions_0", "resnets_1")


def text_name(name: str) -> str:
    """A text-encoder layer name without the ``text_model`` level (files and models may have it)."""
    return name.removeprefix(TEXT_LEVEL)


def _inner(kind: str, rest: str) -> str | None:
    if kind == "resnets":
        return RESNET.get(rest)
    return rest  # a transformer's inner names are the same in both layouts


def sgm_name(name: str, layers_per_block: int) -> str | None:
    """The diffusers name of an original-layout (SGM) UNet layer name; None if ``name`` is not one."""
    if name in TOP:
        return TOP[name]
    n = layers_per_block
    m = MIDDLE.fullmatch(name)
    if m is not None:
        j = int(m.group(1))
        if j >= len(MIDDLE_PARTS):
            return None
        inner = _inner(MIDDLE_PARTS[j].split("_")[0], m.group(2))
        return None if inner is None else f"mid_block_{MIDDLE_PARTS[j]}_{inner}"
    m = BLOCK.fullmatch(name)
    if m is None:
        return None
    which, i, j, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if which == "input_blocks":
        if i == 0:
            return None
        level, item = divmod(i - 1, n + 1)
        if item == n:
            return f"down_blocks_{level}_downsamplers_0_conv" if (j, rest) == (0, "op") else None
        kind = "resnets" if j == 0 else "attentions" if j == 1 else None
        prefix = f"down_blocks_{level}"
    else:
        level, item = divmod(i, n + 1)
        if j > 0 and rest == "conv":  # the level's upsampler (after its resnet and any attention)
            return f"up_blocks_{level}_upsamplers_0_conv"
        kind = "resnets" if j == 0 else "attentions" if j == 1 else None
        prefix = f"up_blocks_{level}"
    if kind is None:
        return None
    inner = _inner(kind, rest)
    return None if inner is None else f"{prefix}_{kind}_{item}_{inner}"


def layers_per_block(unet: object) -> int | None:
    """A diffusers UNet's ``layers_per_block`` (one number), None for other trees."""
    config = getattr(unet, "config", None)
    n = getattr(config, "layers_per_block", None) if config is not None else None
    if isinstance(n, list | tuple):
        n = n[0] if len(set(n)) == 1 else None
    return n if isinstance(n, int) else None

"""ControlNet-Union for SDXL (xinsir's ``controlnet-union-sdxl-1.0`` and its ProMax variant): one
ControlNet for several control types, in diffusers' ``ControlNetUnionModel`` key layout (a diffusers
folder whose ``config.json`` says ``"_class_name": "ControlNetUnionModel"``).

Besides a plain ControlNet's parts it has ``task_embedding`` (a learned vector per control type),
``transformer_layes`` (CLIP-style residual attention blocks; the name's spelling is the files'),
``spatial_ch_projs`` and ``control_add_embedding`` (the multi-hot vector of the unit's types, each
entry through a sinusoidal embedding, added to the timestep embedding). Each control image's
features are averaged to one token, its type's task embedding added, the tokens pass the blocks,
and each image adds its features plus its projected token (a per-channel offset) to the latent's
first features; the rest is a plain ControlNet's encoder copy (``net.ControlNet.trunk``).

The blocks' attention: diffusers (as xinsir's original) feeds ``[batch, tokens, C]`` to a
``nn.MultiheadAttention`` that reads its first axis as the sequence, so a token attends over the
*batch*, to the same position of every row. In its pipeline those rows are copies (CFG's uncond and
cond rows carry the same latent and control image), and attention over identical keys returns the
token's own value, so what it computes is each token through the value and output projections
alone. That is what this module does, per row, so a row's result does not depend on the rows beside
it in a shared batch (sd-webui-controlnet and ComfyUI also attend within one row; with one control
image per unit, as they send, all three agree).

Several images per unit (diffusers' ``control_image=[...]``, ``control_mode=[...]``): their tokens
and features are scaled by the unit's weight inside the network and the outputs are not; with one
image the outputs are scaled (diffusers' rule, kept as is). "auto" (no type: ComfyUI's
SetUnionControlNetType "auto", sd-webui-controlnet's "Unknown") adds the all-zero type vector's
embedding and the plain features with no token, as those two do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from service.sampling.errors import InputError

from .net import ControlNet, ControlNetConfig, ControlNetConfigError

CLASS_NAME = "ControlNetUnionModel"
Deep = Callable[[Tensor | None], list[Tensor]]  # the deeper residuals of some call items (None: all)
# xinsir's control types by index (diffusers' control_mode, ComfyUI's UNION_CONTROLNET_TYPES,
# sd-webui-controlnet's ControlNetUnionControlType order); ProMax adds tile and repaint
TYPES = ("openpose", "depth", "softedge", "canny", "normal", "segment", "tile", "repaint")
AUTO = -1
# ComfyUI's SetUnionControlNetType choices (comfy/cldm/control_types.py), by index
COMFY_TYPES = (
    "openpose",
    "depth",
    "hed/pidi/scribble/ted",
    "canny/lineart/anime_lineart/mlsd",
    "normal",
    "segment",
    "tile",
    "repaint",
)
ALIASES: dict[str, int] = {
    # ComfyUI's SetUnionControlNetType names
    "hed/pidi/scribble/ted": 2,
    "canny/lineart/anime_lineart/mlsd": 3,
    # sd-webui-controlnet's union_control_type values (and webuiapi's)
    "soft edge": 2,
    "hard edge": 3,
    "normal map": 4,
    "segmentation": 5,
    "inpaint": 7,
    # the preprocessor families the extension maps to each type
    "pose": 0,
    "hed": 2,
    "pidi": 2,
    "scribble": 2,
    "ted": 2,
    "lineart": 3,
    "anime_lineart": 3,
    "mlsd": 3,
    "normalmap": 4,
    "seg": 5,
    "blur": 6,
}
AUTO_NAMES = ("auto", "unknown", "none", "")


def control_type(value: Any, count: int, field: str) -> int:
    """A control type given by name (ours, ComfyUI's, A1111's; any case) or index -> its index, or
    :data:`AUTO`; one the model does not have (``count`` types) -> a 422 listing those it has."""
    allowed = ["auto", *TYPES[:count]]
    if value is None or isinstance(value, bool):
        return AUTO if value is None else _refuse(value, allowed, field)
    if isinstance(value, int):
        return value if 0 <= value < count else _refuse(value, allowed, field)
    if isinstance(value, str):
        low = value.strip().lower()
        if low in AUTO_NAMES:
            return AUTO
        idx = TYPES.index(low) if low in TYPES else ALIASES.get(low)
        if idx is None and low.isdigit():
            idx = int(low)
        if idx is not None and idx < count:
            return idx
    return _refuse(value, allowed, field)


def _refuse(value: Any, allowed: list[str], field: str) -> int:
    raise InputError(
        field,
        f"unknown control type {repr(value)[:64]} for this union ControlNet; allowed: {allowed} "
        f"(or 0-{len(allowed) - 2}, ComfyUI's and A1111's names)",
        allowed,
    )


@dataclass
class UnionConfig(ControlNetConfig):
    """diffusers' ControlNetUnionModel config: a ControlNet's plus the type tokens' sizes."""

    num_control_type: int = 6
    num_trans_channel: int = 320
    num_trans_head: int = 8
    num_trans_layer: int = 1
    num_proj_channel: int = 320

    def check(self) -> UnionConfig:
        c0 = self.block_out_channels[0]
        if self.addition_time_embed_dim is None:
            raise ControlNetConfigError("a union ControlNet needs addition_time_embed_dim (SDXL)")
        if self.num_trans_channel != c0 or self.num_proj_channel != c0:
            raise ControlNetConfigError(
                "union ControlNet: num_trans_channel and num_proj_channel must equal "
                f"block_out_channels[0] ({c0})"
            )
        if self.mid_block_type != "UNetMidBlock2DCrossAttn":
            raise ControlNetConfigError("a union ControlNet's middle block is UNetMidBlock2DCrossAttn")
        return self


@dataclass
class Items:
    """A union call's control images: ``images`` [M, 3, H, W] in [0, 1], ``owner`` [M] the item
    (row and unit) each belongs to, ``kinds`` [M] its control type (:data:`AUTO`: none), ``weight``
    [N] each item's unit weight."""

    images: Tensor
    owner: Tensor
    kinds: Tensor
    weight: Tensor


def is_union(raw_config: dict[str, Any]) -> bool:
    return raw_config.get("_class_name") == CLASS_NAME


def is_union_weights(keys: list[str]) -> bool:
    """A diffusers-named state dict of a union ControlNet (a single file with no config beside it)."""
    return "task_embedding" in keys and "control_add_embedding.linear_1.weight" in keys


def infer(sd: dict[str, Tensor]) -> dict[str, Any]:
    """The union part of the config read off the tensors, for a single file (xinsir's
    ``diffusion_pytorch_model_promax.safetensors`` as ComfyUI and A1111 users keep it; the rest is
    ``diffusers_keys.infer_config``). ``num_trans_head`` is not in the shapes and changes nothing here:
    each token attends only to itself (module docstring), so the heads' split never shows."""
    types, width = (int(n) for n in sd["task_embedding"].shape)
    layers = {k.split(".")[1] for k in sd if k.startswith("transformer_layes.")}
    return {
        "num_control_type": types,
        "num_trans_channel": width,
        "num_proj_channel": int(sd["spatial_ch_projs.weight"].shape[0]),
        "num_trans_layer": len(layers),
        # the type embedding and SDXL's size ids share addition_time_embed_dim
        "addition_time_embed_dim": int(sd["control_add_embedding.linear_1.weight"].shape[1]) // types,
    }


class _Mlp(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, width * 4)
        self.c_proj = nn.Linear(width * 4, width)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c_fc(x)
        return self.c_proj(h * torch.sigmoid(1.702 * h))  # type: ignore[no-any-return]  # QuickGELU


class TokenBlock(nn.Module):
    """A CLIP residual attention block on tokens that each attend only to themselves (see the module
    docstring): ``x + out(v(ln_1 x))``, then ``x + mlp(ln_2 x)``. ``attn`` keeps
    ``nn.MultiheadAttention``'s parameter names (``in_proj_weight`` holds q, k, v; v is the last third)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = _Mlp(width)
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[-1]
        w, b = self.attn.in_proj_weight[2 * c :], self.attn.in_proj_bias[2 * c :]
        v = nn.functional.linear(self.ln_1(x), w, b)
        x = x + self.attn.out_proj(v)
        return x + self.mlp(self.ln_2(x))  # type: ignore[no-any-return]


class UnionControlNet(ControlNet):
    """:meth:`union` runs items (a row's unit: one or more control images with their types)."""

    cfg: UnionConfig

    def __init__(self, cfg: UnionConfig) -> None:
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        super().__init__(cfg.check())
        time_dim = cfg.block_out_channels[0] * 4
        assert cfg.addition_time_embed_dim is not None
        self.task_embedding = nn.Parameter(torch.zeros(cfg.num_control_type, cfg.num_trans_channel))
        self.transformer_layes = nn.ModuleList(
            [TokenBlock(cfg.num_trans_channel, cfg.num_trans_head) for _ in range(cfg.num_trans_layer)]
        )
        self.spatial_ch_projs = nn.Linear(cfg.num_trans_channel, cfg.num_proj_channel)
        self.control_type_proj = Timesteps(cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
        self.control_add_embedding = TimestepEmbedding(
            cfg.addition_time_embed_dim * cfg.num_control_type, time_dim
        )

    @property
    def types(self) -> int:
        return self.cfg.num_control_type

    def union(
        self, x: Tensor, t: Tensor, context: Tensor, items: Items, **sdxl: Tensor | None
    ) -> list[Tensor]:
        """``x``, ``t``, ``context``, SDXL's ``y`` and ``time_ids``: one per item (:class:`Items`).
        The residuals scaled by each item's weight as diffusers' ``ControlNetUnionModel`` scales them."""
        shallow, deep = self.union_staged(x, t, context, items, 0, **sdxl)
        return shallow + deep(None)

    def union_staged(
        self, x: Tensor, t: Tensor, context: Tensor, items: Items, level: int, **sdxl: Tensor | None
    ) -> tuple[list[Tensor], Deep]:
        """:meth:`union` in two parts, as ``ControlNet.start`` / ``finish``: the residuals of skips
        0 .. ``level``, and a function giving the others for some items (``pick``; None: all)."""
        images, owner, kinds, weight = items.images, items.owner, items.kinds, items.weight
        dt = self.conv_in.weight.dtype
        n = x.shape[0]
        count = torch.bincount(owner, minlength=n)
        typed = kinds >= 0
        hot = torch.zeros(n, self.types, device=x.device)
        hot[owner[typed], kinds[typed]] = 1.0
        # each of the multi-hot vector's entries through the sinusoidal embedding, side by side
        type_emb = self.control_type_proj(hot.flatten()).reshape(n, -1).to(dt)
        emb = self.embed(x, t, self.control_add_embedding(type_emb), **sdxl)
        feats = self.controlnet_cond_embedding(images.to(dt))
        several = count[owner] > 1  # diffusers: several images -> scaled inside, outputs not
        scale = torch.where(several, weight.to(dt)[owner], torch.ones_like(owner, dtype=dt))
        tokens = (feats.mean(dim=(2, 3)) + self.task_embedding[kinds.clamp(min=0)]) * scale[:, None]
        for block in self.transformer_layes:
            tokens = block(tokens)
        alpha = self.spatial_ch_projs(tokens) * typed[:, None].to(dt)  # "auto": the plain features
        fused = feats * scale[:, None, None, None] + (alpha * scale[:, None])[:, :, None, None]
        fuser = torch.zeros(n, *feats.shape[1:], dtype=feats.dtype, device=feats.device)
        h = self.conv_in(x.to(dt)) + fuser.index_add(0, owner, fused)
        shallow, stage = self.start_from(h, emb, context, level)
        out_scale = torch.where(count > 1, torch.ones_like(weight), weight).to(dt).view(-1, 1, 1, 1)

        def deep(pick: Tensor | None) -> list[Tensor]:
            if pick is None:
                return [o * out_scale for o in self.finish(stage)]
            return [o * out_scale[pick] for o in self.finish(stage.select(pick))]

        return [o * out_scale for o in shallow], deep


def union_call(
    net: UnionControlNet,
    x: Tensor,
    t: Tensor,
    context: Tensor,
    images: Tensor,
    unit: Tensor,
    rows: Tensor,
    slots: Tensor,
    extra: dict[str, Tensor | None],
    level: int,
) -> tuple[Tensor, Tensor, list[Tensor], Deep]:
    """One union ControlNet call for the active (row, slot) pairs that use it (``units.py``'s table:
    column 7 the slot's control type, 8 its unit's number): a call item per (row, unit), its images
    the unit's slots. Returns each item's row, its unit's first slot (weight, mode and mask are the
    unit's, on every slot), the residuals of skips 0 .. ``level`` and the others for some items
    (``Deep``), already weighted."""
    group = unit[rows, slots, 8].long()
    span = int(unit.shape[1]) + 1
    items, owner = torch.unique(rows * span + group, return_inverse=True)
    item_rows = items // span
    lead = torch.full_like(items, span).scatter_reduce(0, owner, slots, reduce="amin")
    picked = {k: (None if v is None else v[item_rows]) for k, v in extra.items()}
    dev = x.device
    kinds = unit[rows, slots, 7].long()
    items = Items(images, owner.to(dev), kinds.to(dev), unit[item_rows, lead, 1].to(dev))
    shallow, deep = net.union_staged(x[item_rows], t[item_rows], context[item_rows], items, level, **picked)
    return item_rows, lead, shallow, deep

"""ControlNet nodes: ControlNetLoader, ControlNetApply, ControlNetApplyAdvanced, SetUnionControlNetType.

A CONTROL_NET names a ControlNet of our store (``model_store/controlnet/``, the names of
``GET /controlnet/model_list``; ComfyUI's file spelling with its extension is accepted too). Applying
it puts a unit on the conditioning; the sampler turns the units of its positive conditioning into
the request's ``controlnets`` (``service/models/controlnet/units.py``): strength is the unit's
weight, start_percent / end_percent its guidance_start / guidance_end, the control image resized as
ComfyUI does (to the sampled size, centre-cropped: ``crop_and_resize``), balanced mode (the unit acts
on the cond and uncond rows, as ComfyUI applies it to both). So a ControlNet workflow shares UNet
calls with all other traffic, ControlNets or none. SetUnionControlNetType sets the control type a
union ControlNet (ControlNet-Union SDXL, ``models/controlnet/union.py``) is applied with: the unit's
``control_type`` ("auto": none, as ComfyUI's empty type list).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import Tensor

from service.models.controlnet.union import COMFY_TYPES

from .node import Catalog, Enum, Float, In, node
from .nodes_model import model_name
from .runtime import NodeRun
from .values import Conditioning, ControlNetRef, ControlUnit

COND, NET, IMAGE = In("CONDITIONING"), In("CONTROL_NET"), In("IMAGE")
STRENGTH = Float(1.0, 0.0, 10.0, 0.01)
PERCENT = {"start_percent": Float(0.0, 0.0, 1.0, 0.001), "end_percent": Float(1.0, 0.0, 1.0, 0.001)}


def _loader(c: Catalog) -> dict[str, In]:
    return {"control_net_name": Enum(c.controlnets, accepts=lambda v: model_name(v) in c.controlnets)}


@node("ControlNetLoader", "loaders", ["CONTROL_NET"], _loader)
async def controlnet_loader(rt: NodeRun, control_net_name: str) -> tuple[Any, ...]:
    """A ControlNet of the store (loaded by the sampler's model when it samples)."""
    return (ControlNetRef(model_name(control_net_name)),)


def _apply(cond: Conditioning, unit: ControlUnit) -> Conditioning:
    return replace(cond, controls=(*cond.controls, unit))


_OLD = {"conditioning": COND, "control_net": NET, "image": IMAGE, "strength": STRENGTH}


@node("ControlNetApply", "conditioning/controlnet", ["CONDITIONING"], _OLD)
async def controlnet_apply(
    rt: NodeRun, conditioning: Conditioning, control_net: ControlNetRef, image: Tensor, strength: float
) -> tuple[Any, ...]:
    """Apply ControlNet (OLD): over the whole schedule."""
    if strength == 0:  # ComfyUI: the conditioning as it came
        return (conditioning,)
    unit = ControlUnit(control_net.name, image, strength, control_type=control_net.control_type)
    return (_apply(conditioning, unit),)


def _advanced(c: Catalog) -> dict[str, In]:
    head = {"positive": COND, "negative": COND, "control_net": NET, "image": IMAGE, "strength": STRENGTH}
    return head | PERCENT | {"vae": In("VAE", optional=True)}


@node(
    "ControlNetApplyAdvanced",
    "conditioning/controlnet",
    [("CONDITIONING", "positive"), ("CONDITIONING", "negative")],
    _advanced,
)
async def controlnet_apply_advanced(
    rt: NodeRun,
    positive: Conditioning,
    negative: Conditioning,
    control_net: ControlNetRef,
    image: Tensor,
    strength: float,
    start_percent: float,
    end_percent: float,
    vae: Any = None,
) -> tuple[Any, ...]:
    """Apply ControlNet: between start_percent and end_percent of the steps (our units' fractions)."""
    if strength == 0:
        return positive, negative
    unit = ControlUnit(
        control_net.name, image, strength, start_percent, end_percent, control_net.control_type
    )
    return _apply(positive, unit), _apply(negative, unit)


_UNION = {"control_net": NET, "type": Enum(["auto", *COMFY_TYPES])}


@node("SetUnionControlNetType", "conditioning/controlnet", ["CONTROL_NET"], _UNION)
async def set_union_controlnet_type(rt: NodeRun, control_net: ControlNetRef, type: str) -> tuple[Any, ...]:
    """The control type a union ControlNet is applied with (ComfyUI's UNION_CONTROLNET_TYPES names)."""
    return (replace(control_net, control_type=type),)

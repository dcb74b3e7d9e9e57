"""sd-webui-controlnet's API: ``alwayson_scripts: {"controlnet": {"args": [unit, ...]}}`` on
txt2img / img2img, and its routes ``/controlnet/model_list``, ``module_list``, ``control_types``,
``version``, ``detect``.

Unit fields as the extension reads them (``internal_controlnet/external_code.py``): ``enabled``
(default true), ``module``, ``model`` (``"None"``: no unit), ``weight``, ``image`` (alias
``input_image``; also ``{"image": ..., "mask": ...}``, ``[image, mask]`` or a list of such dicts),
``mask`` (aliases ``mask_image``, ``effective_region_mask``), ``resize_mode``, ``processor_res`` /
``threshold_a`` / ``threshold_b`` (-1 or out of range: the module's default), ``guidance_start``,
``guidance_end`` (legacy ``guidance``), ``control_mode`` (names or 0-2), ``pixel_perfect``,
``hr_option`` ("Both", "Low res only", "High res only": the hires passes it acts in; without a
hires fix every unit acts),
``union_control_type`` (ControlNet-Union: "OpenPose", "Depth", "Soft Edge", "Hard Edge", "Normal
Map", "Segmentation", "Tile", "Inpaint", "Unknown" = auto; read for union models only). An img2img
unit without an image uses the init image, as the extension does. The script title matches
case-insensitively.
"""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from service.image_gate import MAX_B64_CHARS
from service.models import ipadapter
from service.models.controlnet import MAX_UNITS, annotators, preprocess, scan
from service.models.controlnet.units import CONTROL_MODES
from service.sampling.errors import InputError
from service.serving.hires import hr_option
from service.serving.service import Service

from ..deps import get_state, require_api_key
from .errors import A1111Route

UNIT_FIELDS = (
    "module",
    "model",
    "weight",
    "resize_mode",
    "guidance_start",
    "guidance_end",
    "control_mode",
    "pixel_perfect",
    "processor_res",
    "threshold_a",
    "threshold_b",
)


def script_args(scripts: dict[str, Any] | None) -> list[Any] | None:
    """The ControlNet script's args (title matched case-insensitively), or None."""
    for title, script in (scripts or {}).items():
        if str(title).strip().lower() == "controlnet":
            args = script.get("args") if isinstance(script, dict) else None
            if not isinstance(args, list):
                raise InputError(
                    "alwayson_scripts.controlnet.args", "ControlNet args must be a list of units"
                )
            return args
    return None


# sd-webui-controlnet's IP-Adapter modules (the CLIP encoder they name is picked here by the adapter's width)
IP_MODULES = (
    "ip-adapter_clip_sd15",
    "ip-adapter_clip_sdxl",
    "ip-adapter_clip_sdxl_plus_vith",
    "ip-adapter_clip_h",
)


def is_ip_adapter(module: str) -> bool:
    """Units whose module is ``ip-adapter_*`` (ip-adapter_clip_sd15, ip-adapter_clip_sdxl, ...) are
    IP-Adapter image prompts: our ``ip_adapters``, not ControlNets."""
    return module.strip().lower().startswith("ip-adapter")


def _unit_image(unit: dict[str, Any], field: str, init_image: Any) -> tuple[Any, Any, bool]:
    """A unit's image and mask, and whether the image is the img2img init image: ``image`` /
    ``input_image``, in any of the extension's forms (``get_input_images_rgba``): base64, {"image",
    "mask"}, [image, mask], or a list of {"image", "mask"} (its first: one image a unit here); the
    mask also as ``mask_image`` or ``effective_region_mask``; else the init image (webuiapi sends ""
    for no image)."""
    image = unit.get("image", unit.get("input_image"))
    mask = unit.get("mask") or unit.get("mask_image") or unit.get("effective_region_mask")
    if isinstance(image, (list, tuple)) and image:
        if isinstance(image[0], dict):
            image = image[0]
        elif len(image) == 2:  # (image, mask)
            image, mask = image[0], mask or image[1]
    if isinstance(image, dict):  # the extension's {"image": ..., "mask": ...}
        both: dict[str, Any] = image
        image, mask = both.get("image"), mask or both.get("mask")
    from_init = not image
    image = image or init_image
    if image is None:
        raise InputError(f"{field}.image", "a ControlNet unit needs an image")
    if (not from_init and not isinstance(image, str)) or (mask is not None and not isinstance(mask, str)):
        raise InputError(f"{field}.image", "a ControlNet unit's image and mask are base64 images")
    return image, mask or None, from_init


def ip_units(scripts: dict[str, Any] | None, init_image: Any = None) -> list[dict[str, Any]] | None:
    """Our ``ip_adapters`` for the body's ControlNet units with an ``ip-adapter_*`` module (the unit's
    model names the adapter file; its weight the scale)."""
    out = []
    for i, unit in enumerate(script_args(scripts) or []):
        if not isinstance(unit, dict) or not is_ip_adapter(str(unit.get("module") or "")):
            continue
        if unit.get("enabled", True) is False or str(unit.get("model") or "None").strip().lower() == "none":
            continue
        image, _, _ = _unit_image(unit, f"alwayson_scripts.controlnet.args[{i}]", init_image)
        window = {k: unit[k] for k in ("guidance_start", "guidance_end") if unit.get(k) is not None}
        out.append({"model": unit["model"], "image": image, "weight": unit.get("weight", 1.0), **window})
    return out or None


# The extension's bound_check_params: a preprocessor value out of its slider's range is reset to
# the module's default, not refused (clients send 0 or 4096 for "whatever").
PREPROCESSOR_BOUNDS = {"processor_res": (64, 2048), "threshold_a": (0, 1e4), "threshold_b": (0, 1e4)}
# legacy_field_alias: older clients' names
LEGACY = {"guidance": "guidance_end", "lowvram": "low_vram"}


def units(
    scripts: dict[str, Any] | None,
    init_image: Any = None,
    init_resize_mode: int = 0,
    hires: bool = False,
) -> list[dict[str, Any]] | None:
    """Our ``controlnets`` units for an A1111 body's ControlNet args (None: no ControlNet). Entries
    that are not objects are skipped, as the extension's get_all_units_from does; a unit that takes
    the init image takes the body's ``resize_mode`` with it (``init_resize_mode``), as the extension.
    ``hires``: the body runs a hires fix (a unit's ``hr_option`` picks its passes)."""
    args = script_args(scripts)
    if args is None:
        return None
    out = []
    for i, unit in enumerate(args):
        field = f"alwayson_scripts.controlnet.args[{i}]"
        if not isinstance(unit, dict):
            continue
        for old, new in LEGACY.items():
            if old in unit and new not in unit:
                unit = {**unit, new: unit[old]}
        if unit.get("enabled", True) is False or str(unit.get("model") or "None").strip().lower() == "none":
            continue
        module = str(unit.get("module") or "none")
        if is_ip_adapter(module):
            continue  # ip_units() takes it
        image, mask, from_init = _unit_image(unit, field, init_image)
        ours = {k: unit[k] for k in UNIT_FIELDS if unit.get(k) is not None}
        for k, (low, high) in PREPROCESSOR_BOUNDS.items():  # -1 (unset) or out of range: the module's default
            v = ours.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not low <= v <= high:
                ours.pop(k)
        if from_init:
            ours["resize_mode"] = 0 if init_resize_mode == 3 else init_resize_mode
        ours |= {"module": module, "image": image, "mask": mask or None}
        if unit.get("union_control_type") is not None:  # union ControlNets ("Unknown": auto)
            ours["control_type"] = unit["union_control_type"]
        # hr_option: the passes of a hires fix it acts in (serving/hires.pass_units); without hires
        # the extension hands every unit BOTH (controlnet.py: `unit.hr_option if high_res_fix`)
        hr = hr_option(unit.get("hr_option") or "Both", f"{field}.hr_option")
        if hires:
            ours["hr_option"] = hr
        out.append(ours)
    if len(out) > MAX_UNITS:
        raise InputError("alwayson_scripts.controlnet.args", f"at most {MAX_UNITS} enabled ControlNet units")
    return out or None


router = APIRouter(
    prefix="/controlnet", tags=["a1111"], dependencies=[Depends(require_api_key)], route_class=A1111Route
)


@router.get("/version")
async def version() -> dict[str, int]:
    return {"version": 2}


@router.get("/settings")
async def settings() -> dict[str, int]:
    """The extension's settings route: how many units a request may enable."""
    return {"control_net_unit_count": MAX_UNITS}


@router.get("/model_list")
async def model_list(update: bool = True, state: Service = Depends(get_state)) -> dict[str, Any]:
    """The ControlNets in ``model_store/controlnet/`` and the IP-Adapters in ``model_store/ipadapter/``
    (a unit's ``model``); ``union_types``: the control types of each ControlNet-Union among them."""
    root = state.pool.store.root
    unions = await asyncio.to_thread(_unions, root)
    return {"model_list": sorted({*scan(root), *ipadapter.scan(root)}), "union_types": unions}


def _unions(root: Path) -> dict[str, list[str]]:
    """Our addition (the playground's control-type choice): each ControlNet-Union's name -> the
    ``control_type`` names it serves (6 for controlnet-union-sdxl-1.0, 8 for ProMax), file headers
    read in a worker thread."""
    from service.models.controlnet.files import union_types

    return {name: list(types) for name, info in scan(root).items() if (types := union_types(info))}


@router.get("/module_list")
async def module_list(alias_names: bool = False, state: Service = Depends(get_state)) -> dict[str, Any]:
    """The preprocessors we run: those without weights, then those whose weights are in
    ``model_store/annotators/``."""
    names = preprocess.modules(state.pool.store.root)
    detail = {name: {"model_free": name in preprocess.MODULES, "sliders": []} for name in names}
    return {"module_list": names, "module_detail": detail}


# sd-webui-controlnet's ControlNetUnionControlType.all_tags(): a model named "...union..." fits these
UNION_TAGS = frozenset(
    ("openpose", "depth", "softedge", "scribble", "canny", "lineart", "mlsd", "normalmap", "segmentation")
    + ("inpaint", "tile")
)


def _fits(models: list[str], key: str) -> list[str]:
    """The extension's model filter for a control type: its name in the model's, or a union model
    (ControlNet-Union) for a type the union models serve."""
    return [m for m in models if key in m.lower() or (key in UNION_TAGS and "union" in m.lower())]


@router.get("/control_types")
async def control_types(state: Service = Depends(get_state)) -> dict[str, Any]:
    models = sorted(scan(state.pool.store.root))
    out = {}
    for name, (default, modules) in preprocess.CONTROL_TYPES.items():
        key = name.split("/")[0].lower()
        fits = models if name == "All" else _fits(models, key)
        out[name] = {
            "module_list": modules,
            "model_list": ["None", *fits],
            "default_option": default,
            "default_model": fits[0] if fits and name != "All" else "None",
        }
    if annotators.DEPTH in annotators.available(state.pool.store.root):
        fits = _fits(models, "depth")
        out["Depth"] = {
            "module_list": ["none", annotators.DEPTH],
            "model_list": ["None", *fits],
            "default_option": annotators.DEPTH,
            "default_model": fits[0] if fits else "None",
        }
    poses = [m for m in annotators.available(state.pool.store.root) if m.startswith("openpose")]
    if poses:  # the extension's OpenPose type, with the pose modules whose weights are here
        fits = _fits(models, "openpose")
        out["OpenPose"] = {
            "module_list": ["none", *poses],
            "model_list": ["None", *fits],
            "default_option": "openpose_full" if "openpose_full" in poses else poses[0],  # the extension's
            "default_model": fits[0] if fits else "None",
        }
    adapters = sorted(ipadapter.scan(state.pool.store.root))
    out["IP-Adapter"] = {  # units with these modules are IP-Adapter image prompts (ip_units)
        "module_list": list(IP_MODULES),
        "model_list": ["None", *adapters],
        "default_option": IP_MODULES[0],
        "default_model": adapters[0] if adapters else "None",
    }
    return {"control_types": out}


class DetectRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    controlnet_module: str = Field("none", max_length=64)
    controlnet_input_images: list[str] = Field(default_factory=list, max_length=8)
    controlnet_images: list[str] = Field(default_factory=list, max_length=8)  # webuiapi's name
    controlnet_processor_res: int = Field(512, ge=-1, le=2048)
    controlnet_threshold_a: float = Field(-1, ge=-1e4, le=1e4)
    controlnet_threshold_b: float = Field(-1, ge=-1e4, le=1e4)


def _detect(body: DetectRequest, module: str, root: Path, device: str = "cpu") -> list[str]:
    from service.image_gate import ImageInputError, load

    out = []
    for i, data in enumerate(body.controlnet_input_images or body.controlnet_images):
        if len(data) > MAX_B64_CHARS:
            raise InputError(f"controlnet_input_images[{i}]", "image too large")
        try:
            img = np.asarray(load(data, f"controlnet_input_images[{i}]").image.convert("RGB"))
        except ImageInputError as exc:
            raise InputError(exc.field, exc.message, exc.allowed) from exc
        a = body.controlnet_threshold_a if body.controlnet_threshold_a >= 0 else None
        b = body.controlnet_threshold_b if body.controlnet_threshold_b >= 0 else None
        res = body.controlnet_processor_res if body.controlnet_processor_res > 0 else None
        result = preprocess.run(module, img, res, a, b, root, field="controlnet_module", device=device)
        buf = io.BytesIO()
        Image.fromarray(result).save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


@router.post("/detect")
async def detect(body: DetectRequest, state: Service = Depends(get_state)) -> dict[str, Any]:
    """Run a preprocessor on images (a preview of what a unit's control image becomes)."""
    root = state.pool.store.root
    module = preprocess.module_name(body.controlnet_module, root)
    if module is None:
        raise InputError(
            "controlnet_module", f"unknown module {body.controlnet_module!r}", preprocess.modules(root)
        )
    if not (body.controlnet_input_images or body.controlnet_images):
        raise InputError("controlnet_input_images", "no images given")
    # off the loop (image work, and the pose networks on the model's device)
    images = await asyncio.to_thread(_detect, body, module, root, state.pool.device)
    return {"images": images, "info": "Success"}


__all__ = ["CONTROL_MODES", "router", "units"]

"""How ComfyUI workflows name IP-Adapter files, CLIP vision encoders and cubiq's presets, mapped onto
the store's ``ipadapter/`` folder (``service/models/ipadapter/files.py`` scans it).

- An adapter is listed as ComfyUI lists ``models/ipadapter``: its path under ``ipadapter/`` with its
  extension (``ip-adapter_sd15.safetensors``, ``sdxl_models/ip-adapter_sdxl.safetensors``); our own
  name (the file's stem, what ``ip_adapters[].model`` takes) is accepted too.
- ComfyUI's ``clip_vision`` files are single files; ours are transformers folders. Each folder is
  listed by its path under ``ipadapter/`` (``image_encoder``, ``sdxl_models/image_encoder``), and the
  two file names cubiq's README has users save (ViT-H, ViT-bigG) stand for the folder of that
  family: a hidden width of 1280 (ViT-H-14) or 1664 (ViT-bigG-14), else h94's place for it
  (``models/image_encoder`` or a top-level ``image_encoder``: the ViT-H one; ``sdxl_models/
  image_encoder``: bigG). Any name cubiq's own patterns take for a family resolves the same way.
- IPAdapterUnifiedLoader's presets pick a file by the name patterns of cubiq's ``get_ipadapter_file``
  (per SD 1.x / SDXL); the full-face preset is refused (that layout is not served).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

from service.models.ipadapter import files

FOLDER = "ipadapter"
# cubiq's clip vision patterns (utils.get_clipvision_file) and the names its README asks for
VIT_H = re.compile(r"(ViT.H.14.*s32B.b79K|ipadapter.*sd15|sd1.?5.*model)\.(bin|safetensors)$", re.I)
VIT_G = re.compile(r"(ViT.bigG.14.*39B.b160k|ipadapter.*sdxl|sdxl.*model)\.(bin|safetensors)$", re.I)
COMFY_ENCODERS = {
    "vit-h": "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
    "vit-g": "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors",
}
_WIDTHS = {1280: "vit-h", 1664: "vit-g"}  # the two encoders' hidden sizes
_PLACES = {"models/image_encoder": "vit-h", "image_encoder": "vit-h", "sdxl_models/image_encoder": "vit-g"}


def _ext(*stems: str) -> list[re.Pattern[str]]:
    return [re.compile(stem + r"\.(safetensors|bin)$", re.I) for stem in stems]


@dataclass(frozen=True)
class Preset:
    """One of cubiq's presets: the file patterns for SD 1.x and for SDXL (empty: none for that family,
    tried in order), or why it is not served."""

    sd15: tuple[re.Pattern[str], ...]
    sdxl: tuple[re.Pattern[str], ...]
    refused: str = ""


# IPAdapterUnifiedLoader's preset list, in its order (IPAdapterPlus.py), with get_ipadapter_file's patterns
PRESETS = {
    "LIGHT - SD1.5 only (low strength)": Preset((*_ext(r"sd15.light.v11", r"sd15.light"),), ()),
    "STANDARD (medium strength)": Preset((*_ext(r"ip.adapter.sd15"),), (*_ext(r"ip.adapter.sdxl.vit.h"),)),
    "VIT-G (medium strength)": Preset((*_ext(r"sd15.vit.g"),), (*_ext(r"ip.adapter.sdxl"),)),
    "PLUS (high strength)": Preset((*_ext(r"ip.adapter.plus.sd15"),), (*_ext(r"plus.sdxl.vit.h"),)),
    "PLUS FACE (portraits)": Preset((*_ext(r"plus.face.sd15"),), (*_ext(r"plus.face.sdxl.vit.h"),)),
    "FULL FACE - SD1.5 only (portraits stronger)": Preset(
        (), (), "full-face adapters (an MLP projection) are not served; the plain and plus layouts are"
    ),
}


def adapter_files(root: Path) -> dict[str, str]:
    """ComfyUI's listing of the adapters -> our adapter name (each usable file once)."""
    base = Path(root) / FOLDER
    return {info.path.relative_to(base).as_posix(): name for name, info in sorted(files.scan(root).items())}


def adapter_name(value: str, listed: dict[str, str]) -> str | None:
    """Our adapter name for an ``ipadapter_file`` value: a listed path, or a file name or stem whose
    stem is an adapter of the store (a workflow from another machine's folder layout)."""
    if value in listed:
        return listed[value]
    stem = value.replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in files.SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return stem if stem in listed.values() else None


def _family(enc: files.EncoderFolder, rel: str) -> str | None:
    return _WIDTHS.get(enc.hidden_size) or _PLACES.get(rel)


def encoder_names(root: Path) -> dict[str, str]:
    """The CLIP vision names we list -> the encoder folder (relative to ``ipadapter/``): each folder
    by its path, then ComfyUI's file name for each family present."""
    base = Path(root) / FOLDER
    out: dict[str, str] = {}
    families: dict[str, str] = {}
    for enc in files.encoders(root):
        rel = enc.path.relative_to(base).as_posix()
        out[rel] = rel
        fam = _family(enc, rel)
        if fam is not None:
            families.setdefault(fam, rel)
    return out | {COMFY_ENCODERS[fam]: rel for fam, rel in sorted(families.items())}


def encoder_folder(value: str, listed: dict[str, str]) -> str | None:
    """The encoder folder a ``clip_name`` value names: a listed name, or one cubiq's patterns take
    for the ViT-H or the bigG encoder (``sd15_model.safetensors``...)."""
    if value in listed:
        return listed[value]
    name = value.replace("\\", "/").rsplit("/", 1)[-1]
    for fam, pattern in (("vit-h", VIT_H), ("vit-g", VIT_G)):
        if pattern.search(name):
            return listed.get(COMFY_ENCODERS[fam])
    return None


def preset_file(preset: str, sdxl: bool, listed: dict[str, str]) -> str | None:
    """The listed adapter file a preset picks for the model's family (the first match, as cubiq's)."""
    for pattern in PRESETS[preset].sdxl if sdxl else PRESETS[preset].sd15:
        found = [f for f in listed if pattern.search(f)]
        if found:
            return found[0]
    return None


def preset_wants(preset: str) -> str:
    """What a preset looks for, for its error message."""
    p = PRESETS[preset]
    parts = [
        f"{fam}: {' or '.join(x.pattern for x in pats)}"
        for fam, pats in (("SD 1.x", p.sd15), ("SDXL", p.sdxl))
    ]
    return "; ".join(part for part, pats in zip(parts, (p.sd15, p.sdxl), strict=True) if pats)


_LAYOUTS: dict[tuple[str, int, int], str | None] = {}  # (path, size, mtime) -> problem: read once
_LAYOUTS_LOCK = threading.Lock()  # validations run in worker threads


def file_problem(root: Path, rel: str) -> str | None:
    """Why an adapter file is not one we run (a FaceID or full-face adapter, not an IP-Adapter at all),
    from its tensor names only (a safetensors header; a .bin memory-mapped), or None."""
    path = Path(root) / FOLDER / rel
    try:
        st = path.stat()
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _LAYOUTS_LOCK:
        if key in _LAYOUTS:
            return _LAYOUTS[key]
    problem = _layout_problem(path)
    with _LAYOUTS_LOCK:
        _LAYOUTS[key] = problem
        while len(_LAYOUTS) > 256:
            _LAYOUTS.pop(next(iter(_LAYOUTS)))
    return problem


def _names(path: Path) -> tuple[set[str], set[str]]:
    """The image_proj and ip_adapter tensor names of an adapter file."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            flat = list(f.keys())
        groups: dict[str, set[str]] = {"image_proj": set(), "ip_adapter": set()}
        for k in flat:
            head, _, rest = k.partition(".")
            groups.get(head, set()).add(rest)
        return groups["image_proj"], groups["ip_adapter"]
    import torch

    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not the zip format: no memory map
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    proj, ip = (raw.get(g) if isinstance(raw, dict) else None for g in ("image_proj", "ip_adapter"))
    return set(proj) if isinstance(proj, dict) else set(), set(ip) if isinstance(ip, dict) else set()


def _layout_problem(path: Path) -> str | None:
    try:
        proj, ip = _names(path)
    except Exception as exc:  # truncated, not a tensor file, pickled code: all "not an IP-Adapter"
        return f"is not a readable IP-Adapter file ({type(exc).__name__})"
    if not proj or not ip:
        return "is not an IP-Adapter file (no image_proj / ip_adapter tensors)"
    if {"proj.weight", "norm.weight"} <= proj or {"latents", "proj_in.weight"} <= proj:
        return None  # plain / plus: what files.read runs
    if "proj.3.weight" in proj:
        return "is a full-face IP-Adapter (MLP projection): not served; plain and plus adapters are"
    if any("lora" in k for k in ip) or "proj.2.weight" in proj:
        return "is a FaceID IP-Adapter (InsightFace embeddings): not served; plain and plus adapters are"
    return "is an IP-Adapter layout that is not served (plain and plus adapters are)"

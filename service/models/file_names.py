"""Which file names in the model store become names a request can use (LoRA, ControlNet,
IP-Adapter files): what people download keeps its name (Civitai's "detail_tweaker(v1.5)",
"[LoCon] style", CJK names), as A1111 lists any file stem."""

from __future__ import annotations

from pathlib import Path

# ``:`` ``<`` ``>`` delimit A1111's ``<lora:name:weight>`` tags; the rest are path or shell syntax.
FORBIDDEN = frozenset(':<>/\\|?*"')


def usable_name(stem: str) -> bool:
    """Whether a file's stem can be a request's name for it: not empty or hidden, no delimiter or
    control character, no leading or trailing space (a tag's name is read stripped)."""
    return (
        bool(stem)
        and stem == stem.strip()
        and not stem.startswith(".")
        and not any(c in FORBIDDEN or not c.isprintable() for c in stem)
    )


def listing(folder: Path) -> list[Path]:
    """The entries of a store folder, sorted; none when it cannot be listed (missing, not a folder,
    or one the service's user may not read: the store's indexes then list nothing from it instead of
    failing every route that lists them; GET /models ``errors`` names the folder)."""
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []


def model_folders(root: Path) -> list[Path]:
    """The store's model folders (a ``manifest.json`` inside), for the indexes that read each model's
    own files (``<model>/loras``, ``<model>/embeddings``); folders the service may not read are left
    out, not raised."""
    out = []
    for d in listing(root):
        try:
            if (d / "manifest.json").is_file():
                out.append(d)
        except OSError:  # a folder the service's user may not enter (GET /models errors names it)
            continue
    return out


def is_file(path: Path) -> bool:
    """``path.is_file()``, False where the service's user may not look (a folder it may not enter)."""
    try:
        return path.is_file()
    except OSError:
        return False

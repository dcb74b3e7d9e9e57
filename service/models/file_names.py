"""Which file names in the model store become names a request can use (LoRA, ControlNet,
IP-Adapter files): what people download keeps its name (Civitai's "detail_tweaker(v1.5)",
"[LoCon] style", CJK names), as A1111 lists any file stem."""

from __future__ import annotations

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

"""A1111's "infotext": the generation parameters as the ``parameters`` PNG chunk of A1111 and
Civitai, e.g.::

    a cat
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, Model: sd1

:func:`from_parameters` writes it from our parameters (one image's, as the PNG chunk holds them);
:func:`parse` reads it back into A1111's png-info ``parameters`` dict.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .a1111_names import sampler_display, schedule_label

VERSION = "kdiffusion-service"
_PAIR = re.compile(r'\s*([\w][\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _quote(value: Any) -> str:
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text and '"' not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _num(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _prompt_line(p: dict[str, Any]) -> str:
    if p.get("a1111_prompt") is not None:
        return str(p["a1111_prompt"])
    if p.get("prompt") is not None:
        return str(p["prompt"])
    label = p.get("class_label")
    if isinstance(label, list):
        label = label[int(p.get("index", 0)) % len(label)] if label else None
    return "" if label is None else str(label)


def from_parameters(p: dict[str, Any]) -> str:
    """One image's infotext from our parameters (keys as ``build_job`` writes them, plus ``seed``)."""
    negative = p.get("a1111_negative_prompt", p.get("negative_prompt"))
    pairs: list[tuple[str, Any]] = [
        ("Steps", p.get("steps")),
        ("Sampler", sampler_display(str(p["sampler"])) if p.get("sampler") else None),
        ("Schedule type", schedule_label(str(p["schedule"])) if p.get("schedule") else None),
        ("CFG scale", _num(p["cfg_scale"]) if p.get("cfg_scale") is not None else None),
        ("Seed", p.get("seed")),
        ("Size", f"{p['width']}x{p['height']}" if p.get("width") and p.get("height") else None),
        ("Model", p.get("model")),
    ]
    if p.get("img2img") and p.get("denoise") is not None:
        pairs.append(("Denoising strength", _num(p["denoise"])))
    subseeds, index = p.get("subseeds"), int(p.get("index", 0))
    if subseeds and p.get("subseed_strength"):
        pairs.append(("Variation seed", subseeds[index % len(subseeds)]))
        pairs.append(("Variation seed strength", _num(p["subseed_strength"])))
    if p.get("clip_skip") is not None:
        pairs.append(("Clip skip", p["clip_skip"]))
    pairs.extend((str(k), v) for k, v in (p.get("a1111_extra") or {}).items())
    pairs.append(("Version", VERSION))
    lines = [_prompt_line(p)]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in pairs if v is not None))
    return "\n".join(lines)


def parse(text: str) -> dict[str, Any]:
    """A1111's png-info ``parameters``: Prompt, Negative prompt, and each "Key: value" pair (strings),
    Size split into Size-1 / Size-2."""
    lines = text.strip().split("\n")
    pairs_line = lines[-1] if len(lines) > 1 or len(_PAIR.findall(lines[-1])) >= 3 else ""
    if pairs_line and len(_PAIR.findall(pairs_line)) < 3:
        pairs_line = ""
    body = lines[:-1] if pairs_line else lines
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    out: dict[str, Any] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PAIR.findall(pairs_line):
        if value.startswith('"'):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        out[key.strip()] = value
        if key.strip() == "Size" and "x" in value:
            out["Size-1"], out["Size-2"] = value.split("x", 1)
    return out

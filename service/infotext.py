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
from bisect import bisect_left
from typing import Any

from .a1111_names import sampler_display, schedule_label

VERSION = "kdiffusion-service"
# The longest infotext parsed. A1111's own are a few KB (long prompts, extension fields); a PNG text
# chunk may hold 1 MiB (image_gate), so this is the bound, not the chunk limit.
MAX_CHARS = 256 * 1024
_NOT_KEY = re.compile(r"[^\w \-/+]")  # a character no key contains
_WORD = re.compile(r"\w")
_SPACES = re.compile(r"\s*")
_IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")  # A1111's re_imagesize
_QUOTED = re.compile(r'"(?:\\.|[^\\"])*"')  # one way to match each character: no backtracking blow-up


class InfotextTooLong(ValueError):
    pass


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
    if p.get("img2img") and p.get("noise_multiplier") not in (None, 1, 1.0) and "a1111_extra" not in p:
        pairs.append(("Noise multiplier", _num(p["noise_multiplier"])))
    if isinstance(p.get("hires"), dict) and "a1111_extra" not in p:  # A1111's routes write their own
        pairs.extend(hires_pairs(p["hires"]))
    pairs.extend((str(k), v) for k, v in (p.get("a1111_extra") or {}).items())
    pairs.append(("Version", VERSION))
    lines = [_prompt_line(p)]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in pairs if v is not None))
    return "\n".join(lines)


def hires_pairs(h: dict[str, Any]) -> list[tuple[str, Any]]:
    """A1111's hires fix fields from our recorded ``hires`` (serving/hires.py), in A1111's order."""
    out: list[tuple[str, Any]] = [("Denoising strength", _num(h.get("denoise")))]
    if "scale" in h:
        out.append(("Hires upscale", _num(h["scale"])))
    else:
        out.append(("Hires resize", f"{h.get('resize_x', 0)}x{h.get('resize_y', 0)}"))
    out += [("Hires steps", h.get("steps")), ("Hires upscaler", h.get("upscaler"))]
    out.append(("Hires sampler", sampler_display(str(h["sampler"])) if h.get("sampler") else None))
    out.append(("Hires schedule type", schedule_label(str(h["schedule"])) if h.get("schedule") else None))
    return out + [("Hires prompt", h.get("prompt")), ("Hires negative prompt", h.get("negative_prompt"))]


def parse(text: str) -> dict[str, Any]:
    """A1111's png-info ``parameters``: Prompt, Negative prompt, and each "Key: value" pair (strings),
    each "WxH" value also split into Key-1 / Key-2, and A1111's defaults for what is missing
    (:data:`A1111_DEFAULTS`). Linear in the text's length; longer than :data:`MAX_CHARS`:
    :class:`InfotextTooLong`."""
    if len(text) > MAX_CHARS:
        raise InfotextTooLong(f"the infotext is {len(text)} characters; at most {MAX_CHARS} are read")
    lines = text.strip().split("\n")
    pairs = pairs_of(lines[-1])
    if len(pairs) < 3:  # not a "Key: value, ..." line: all of it is prompt
        pairs = []
    body = lines[:-1] if pairs else lines
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in body:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    out: dict[str, Any] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in pairs:
        if value.startswith('"') and value.endswith('"'):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        out[key.strip()] = value
        size = _IMAGE_SIZE.match(value) if isinstance(value, str) else None
        if size is not None:  # A1111 splits every "WxH" value (Size, Hires resize, ...) into -1 / -2
            out[f"{key.strip()}-1"], out[f"{key.strip()}-2"] = size.group(1), size.group(2)
    for key, value in A1111_DEFAULTS.items():
        out.setdefault(key, value)
    return out


# What A1111's parse_generation_parameters (infotext_utils.py) fills in for fields an infotext leaves
# out, so clients pasting png-info's parameters back find them as with A1111 (the values are its).
A1111_DEFAULTS: dict[str, Any] = {
    "Clip skip": "1",
    "Hires resize-1": 0,
    "Hires resize-2": 0,
    "Hires sampler": "Use same sampler",
    "Hires schedule type": "Use same scheduler",
    "Hires checkpoint": "Use same checkpoint",
    "Hires prompt": "",
    "Hires negative prompt": "",
    "Mask mode": "Inpaint masked",
    "Masked content": "original",
    "Inpaint area": "Whole picture",
    "Masked area padding": 32,
    "RNG": "GPU",
    "Schedule type": "Automatic",
    "Schedule max sigma": 0,
    "Schedule min sigma": 0,
    "Schedule rho": 0,
    "VAE Encoder": "Full",
    "VAE Decoder": "Full",
    "FP8 weight": "Disable",
    "Refiner switch by sampling steps": False,
}


def pairs_of(line: str) -> list[tuple[str, str]]:
    r"""The (key, value) pairs of an infotext's last line, as A1111's pattern
    ``\s*(\w[\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)`` finds them, in one pass: that
    pattern retries every start of a long key-like run (40,000 letters without a colon took
    seconds). Here a key is the run of key characters just before a colon, from its first word
    character; a value a quoted string followed by a comma or the end, else the text to the next
    comma. Each step starts where the last ended, so the work is linear in the line's length."""
    out: list[tuple[str, str]] = []
    n, pos = len(line), 0
    breaks = [m.start() for m in _NOT_KEY.finditer(line)]  # where a key run cannot continue
    memo: tuple[int, int] | None = None  # (opening, closing) quote of the last quoted scan; -1: unclosed
    while pos < n:
        colon = line.find(":", pos)
        if colon < 0:
            break
        before = bisect_left(breaks, colon) - 1  # the last break before the colon
        start = max(pos, breaks[before] + 1 if before >= 0 else 0)
        word = _WORD.search(line, start, colon)
        if word is None:  # no word character before this colon: no pair ends here
            pos = colon + 1
            continue
        key = line[word.start() : colon]
        spaces = _SPACES.match(line, colon + 1)  # whitespace may be empty: it always matches
        j = spaces.end() if spaces else colon + 1
        if j < n and line[j] == '"':
            if memo is not None and memo[0] < j and (memo[1] < 0 or j < memo[1]):
                close = memo[1]  # a quote escaped in the last scan ends where that scan ended
            else:
                quoted = _QUOTED.match(line, j)
                close = quoted.end() - 1 if quoted else -1
                memo = (j, close)
            if close >= 0 and (close + 1 == n or line[close + 1] == ","):
                out.append((key, line[j : close + 1]))
                pos = close + 2
                continue
        comma = line.find(",", j)
        end = n if comma < 0 else comma
        out.append((key, line[j:end]))
        pos = end + 1
    return out

"""A1111's prompt attention syntax: ``(word)``, ``(word:1.3)``, ``[word]``, escapes and ``BREAK``.

:func:`parse` splits a prompt into ``(text, weight)`` fragments the way AUTOMATIC1111's web UI
reads it:

- ``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by 1.1; brackets nest
  and multiply, and brackets left open at the end still apply to what follows them.
- ``(text:1.3)`` multiplies by the given number instead (only for round brackets).
- ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\\\`` are the literal characters; a stray ``)`` or ``]`` is
  kept as text.
- ``BREAK`` (the word, in capitals) starts a new 75-token chunk; it comes back as the fragment
  :data:`BREAK_FRAGMENT`.
- neighbouring fragments of equal weight are merged; an empty prompt is ``[("", 1.0)]``.

Pure python: the encoder (``service.models.sd_text``) turns fragments into per-token weights.
"""

from __future__ import annotations

import re

ROUND = 1.1
SQUARE = 1 / 1.1
BREAK_WEIGHT = -1.0
BREAK_FRAGMENT = ("BREAK", BREAK_WEIGHT)

# One token of the attention grammar per match; group 1 is the number of a "(text:number)" close.
_TOKEN = re.compile(
    r"""
      \\[()\[\]\\]            # an escaped bracket or backslash
    | \\                      # a lone backslash (dropped)
    | [(\[]                   # an opening bracket
    | :\s*([+-]?[.\d]+)\s*\)  # ":1.3)" closes a round bracket with a weight
    | [)\]]                   # a closing bracket
    | [^\\()\[\]:]+           # plain text
    | :                       # a colon that closes nothing
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse(prompt: str) -> list[tuple[str, float]]:
    """``(text, weight)`` fragments of ``prompt``; ``BREAK`` is :data:`BREAK_FRAGMENT`."""
    out: list[list] = []  # [text, weight], mutable while brackets close
    opened: dict[str, list[int]] = {"(": [], "[": []}

    def scale(start: int, factor: float) -> None:
        for frag in out[start:]:
            frag[1] *= factor

    for m in _TOKEN.finditer(prompt):
        tok, number = m.group(0), m.group(1)
        if tok.startswith("\\"):
            out.append([tok[1:], 1.0])  # a lone backslash vanishes, as in A1111
        elif tok in opened:
            opened[tok].append(len(out))
        elif number is not None and opened["("]:
            scale(opened["("].pop(), _number(number))
        elif tok == ")" and opened["("]:
            scale(opened["("].pop(), ROUND)
        elif tok == "]" and opened["["]:
            scale(opened["["].pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(tok)):
                if i:
                    out.append(list(BREAK_FRAGMENT))
                out.append([part, 1.0])
    for start in opened["("]:
        scale(start, ROUND)
    for start in opened["["]:
        scale(start, SQUARE)
    return _merge(out)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:  # "1.2.3" matches the pattern but is no number: A1111 would fail; keep weight
        return 1.0


def _merge(frags: list[list]) -> list[tuple[str, float]]:
    merged: list[list] = []
    for text, weight in frags:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(t, w) for t, w in merged] or [("", 1.0)]


def is_plain(prompt: str) -> bool:
    """True when ``prompt`` reads as itself at weight 1 (no brackets, escapes or BREAK)."""
    return parse(prompt) == [(prompt, 1.0)]

"""Bounds on the free-form parts of frontend bodies (fields A1111 clients send that we ignore or
store: unknown fields, ``override_settings``, ``alwayson_scripts``, options).

Those values are echoed back (A1111's ``parameters``) or stored (``/options``); a value nested
hundreds deep parses, but fails when it is serialised again (a 500 after the image was made). So
they are refused up front, iteratively (no recursion to overflow), as a 422 naming the field.
"""

from __future__ import annotations

from typing import Any

from ..validation import FieldError

# ControlNet's units (alwayson_scripts.controlnet.args[i].{...}) are 4 levels; real clients stay
# well below this.
MAX_DEPTH = 32


def depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """The nesting depth of a JSON value (a scalar is 0), counted up to ``limit + 1``."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        level += 1
        deepest = max(deepest, level)
        if deepest > limit:
            return deepest
        stack.extend((child, level) for child in children)
    return deepest


def check_depth(value: Any, field: str, limit: int = MAX_DEPTH) -> None:
    if depth(value, limit) > limit:
        raise FieldError(field, f"{field} is nested deeper than {limit} levels")

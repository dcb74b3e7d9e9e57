"""Bounds on the free-form parts of frontend bodies (fields A1111 clients send that we ignore or
store: unknown fields, ``override_settings``, ``alwayson_scripts``, options).

Those values are echoed back (A1111's ``parameters``) or stored (``/options``); a value nested
hundreds deep parses, but fails when it is serialised again (a 500 after the image was made). So
they are refused up front, iteratively (no recursion to overflow), as a 422 naming the field.
"""

from __future__ import annotations

from typing import Any

from service.sampling.errors import InputError

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
        raise InputError(field, f"{field} is nested deeper than {limit} levels")


# What a request may ask a fixed-size model's images to be resized to (the resize and the PNGs
# happen on the server whatever the model made): per image, and for all images of one request.
MAX_RESIZE_SIDE = 2048  # A1111's own UI limit
MAX_OUTPUT_PIXELS = 2**26  # 16 images of 2048x2048, 256 of 512x512


def check_resize(size: tuple[int, int], images: int, fields: tuple[str, str, str]) -> None:
    """``size`` (width, height) for ``images`` images; ``fields``: the width, height and count fields."""
    for side, field in zip(size, fields[:2], strict=True):
        if side > MAX_RESIZE_SIDE:
            message = f"{field} must be at most {MAX_RESIZE_SIDE} for a fixed-size model (images are resized)"
            raise InputError(field, message, [8, MAX_RESIZE_SIDE])
    if size[0] * size[1] * images > MAX_OUTPUT_PIXELS:
        message = f"images x width x height must be at most {MAX_OUTPUT_PIXELS} pixels for a fixed-size model"
        raise InputError(fields[2], message)

"""A1111's ``/sdapi/v1/options`` kept per caller, bounded.

A1111 keeps one global options object; clients (webuiapi's ``set_options``, SillyTavern's model
picker) POST any subset of it. Here:

- the options we read or report are typed (:data:`KNOWN`): a wrong type is a 422 naming the option,
  before anything is stored, and ``override_settings`` on txt2img/img2img goes through the same check;
- any other key is kept (so a client reads back what it set) within :data:`MAX_UNKNOWN` keys and
  :data:`MAX_UNKNOWN_BYTES` of JSON per caller, each value nested at most
  :data:`~.limits.MAX_DEPTH` deep; beyond that a 422, nothing stored;
- at most :data:`MAX_CALLERS` callers are kept, least recently used dropped first. A caller is its
  API key; without keys, every request without credentials shares one ``server`` entry (as A1111's
  one global object) and each distinct ``Authorization`` header is its own (bounded by the LRU).
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from service.sampling.errors import InputError
from service.sampling.spec import MAX_NOISE_MULTIPLIER

from .a1111_encode import FORMATS
from .limits import check_depth

MAX_CALLERS = 1024
MAX_UNKNOWN = 64  # options we do not read, per caller
MAX_UNKNOWN_BYTES = 16 * 1024  # their JSON size, per caller
MAX_TEXT = 512  # a known text option's length


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise InputError(name, f"{name} must be a string of at most {MAX_TEXT} characters")
    return value


def _int_in(lo: int, hi: int) -> Callable[[str, Any], int]:
    def check(name: str, value: Any) -> int:
        # bools are ints in Python and JSON integers may arrive as 2.0 from some clients
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            message = f"{name} must be an integer in [{lo}, {hi}], got {_shown(value)}"
            raise InputError(name, message, [lo, hi])
        return value

    return check


def _optional_text(name: str, value: Any) -> str | None:
    return None if value is None else _text(name, value)


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InputError(name, f"{name} must be true or false, got {_shown(value)}", [True, False])
    return value


def _float_in(lo: float, hi: float) -> Callable[[str, Any], float]:
    def check(name: str, value: Any) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or not lo <= value <= hi:
            message = f"{name} must be a number in [{lo:g}, {hi:g}], got {_shown(value)}"
            raise InputError(name, message, [lo, hi])
        return float(value)

    return check


def _samples_format(name: str, value: Any) -> str:
    """A1111's API encodes png, jpg / jpeg or webp (any case); anything else is its 500 there."""
    if not isinstance(value, str) or value.strip().lower() not in FORMATS:
        raise InputError(
            name, f"{name} must be one of {', '.join(FORMATS)}, got {_shown(value)}", list(FORMATS)
        )
    return value


# The options we read (model, clip skip, image format, img2img noise) or report in GET /options,
# with their checks.
KNOWN: dict[str, Callable[[str, Any], Any]] = {
    "sd_model_checkpoint": _text,
    "sd_checkpoint_hash": _optional_text,
    "sd_vae": _text,
    "CLIP_stop_at_last_layers": _int_in(1, 12),
    "samples_format": _samples_format,
    "jpeg_quality": _int_in(1, 100),
    "webp_lossless": _bool,
    "initial_noise_multiplier": _float_in(0.0, MAX_NOISE_MULTIPLIER),
    "eta_noise_seed_delta": _int_in(0, 2**63 - 1),
    "sd_checkpoints_limit": _int_in(1, 2**31 - 1),
}


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def check_known(name: str, value: Any, field: str | None = None) -> Any:
    """``value`` checked as the known option ``name`` (the error names ``field``, default ``name``)."""
    return KNOWN[name](field or name, value)


def clip_skip(overrides: Mapping[str, Any], options: Mapping[str, Any]) -> int:
    """The request's clip skip: override_settings, else the caller's options, else 1."""
    name = "CLIP_stop_at_last_layers"
    if overrides.get(name) is not None:
        return int(check_known(name, overrides[name], f"override_settings.{name}"))
    return int(options.get(name) or 1)


def noise_multiplier(given: float | None, overrides: Mapping[str, Any], options: Mapping[str, Any]) -> float:
    """img2img's initial_noise_multiplier: the body's, else override_settings', else the caller's
    options', else 1. (A1111 reads the body's, else its options', when the request is built; an
    override is honoured here too rather than dropped: it is how A1111 pastes an infotext's
    "Noise multiplier" back.)"""
    name = "initial_noise_multiplier"
    if given is not None:
        return float(given)
    if overrides.get(name) is not None:
        return float(check_known(name, overrides[name], f"override_settings.{name}"))
    return float(options.get(name, 1.0) if options.get(name) is not None else 1.0)


def _checked(name: str, value: Any, field: str) -> Any:
    """A known option typed, any other value nested at most MAX_DEPTH (errors name ``field``)."""
    if name in KNOWN and value is not None:
        return check_known(name, value, field)
    check_depth(value, field)
    return value


def check_overrides(overrides: Mapping[str, Any]) -> None:
    """A request's ``override_settings``: known options typed, the rest nested at most MAX_DEPTH."""
    for name, value in overrides.items():
        _checked(name, value, f"override_settings.{name}")


def _size(values: Mapping[str, Any]) -> int:
    return len(json.dumps(dict(values), allow_nan=False, default=str))


class OptionsStore:
    """The options each caller set, bounded in callers, unknown keys and bytes."""

    def __init__(
        self,
        max_callers: int = MAX_CALLERS,
        max_unknown: int = MAX_UNKNOWN,
        max_bytes: int = MAX_UNKNOWN_BYTES,
    ) -> None:
        self.max_callers, self.max_unknown, self.max_bytes = max_callers, max_unknown, max_bytes
        self._by_caller: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_caller)

    def get(self, scope: str) -> dict[str, Any]:
        """The caller's options (a copy; empty for a caller not seen or dropped)."""
        opts = self._by_caller.get(scope)
        if opts is None:
            return {}
        self._by_caller.move_to_end(scope)
        return dict(opts)

    def update(self, scope: str, body: Mapping[str, Any]) -> None:
        """Check every value of ``body`` first, then store them all (or nothing: a 422)."""
        checked: dict[str, Any] = {}
        for name, value in body.items():
            if len(name) > MAX_TEXT:
                raise InputError("options", f"option names are at most {MAX_TEXT} characters")
            checked[name] = _checked(name, value, name)
        merged = {**self._by_caller.get(scope, {}), **checked}
        unknown = {k: v for k, v in merged.items() if k not in KNOWN}
        if len(unknown) > self.max_unknown:
            known = ", ".join(KNOWN)
            message = f"at most {self.max_unknown} options other than {known} are kept per caller"
            raise InputError("options", message)
        try:
            size = _size(unknown)
        except ValueError as exc:  # NaN / Infinity: not JSON a client could read back
            raise InputError("options", "option values must be finite numbers") from exc
        if size > self.max_bytes:
            message = f"options other than the known ones may hold {self.max_bytes} bytes of JSON per caller"
            raise InputError("options", message)
        self._by_caller[scope] = merged
        self._by_caller.move_to_end(scope)
        while len(self._by_caller) > self.max_callers:
            self._by_caller.popitem(last=False)

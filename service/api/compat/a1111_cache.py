"""Step caching on the A1111 routes: what A1111 clients can send.

- The options of the sd-webui DeepCache extension (aria1th/sd-webui-deepcache-standalone), which
  clients set in ``override_settings`` or through ``POST /sdapi/v1/options``: the switch, as its
  current versions spell it, ``deepcache_enable_pass`` ("disable", "second pass", "both passes"; since
  January 2024) or as its first ones did, ``deepcache_enable`` (bool); and
  ``deepcache_full_run_step_rate`` (a full step every N; the extension's default 5) and
  ``deepcache_cache_enable_step_percentage`` (no caching before that share of the steps; its default
  0.4), our ``start``; ``deepcache_cache_resnet_level`` (its default 0), our ``level``: the same
  split on the SD UNet (models/stepcache/sd_unet.py). Our cache acts on every pass, so "second pass"
  is refused for a request with a hires fix (and is off without one: there is no second pass), as is
  ``deepcache_hr_reuse`` (the extension's second pass reads the first pass's cached features, kept
  per step; ours runs at the new size from a full evaluation). The ``_hr`` start percentage is not
  read (docs/STEP_CACHE.md).
- Our own ``cache`` object at the top of the body (``{"method", "interval" | "threshold"}``, as on
  ``/sample``), which also reaches fbcache on SD3 / Flux; it wins over the options.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from service.sampling.errors import InputError

ENABLE, RATE = "deepcache_enable", "deepcache_full_run_step_rate"
PASS = "deepcache_enable_pass"
PASSES = ["disable", "second pass", "both passes"]
EXTENSION_RATE = 5  # the extension's default refresh rate
START = "deepcache_cache_enable_step_percentage"
EXTENSION_START = 0.4  # the extension's default: no caching in the first 40 % of the steps
LEVEL, HR_REUSE = "deepcache_cache_resnet_level", "deepcache_hr_reuse"
LEVELS = list(range(11))  # the extension's slider: 0-10


def cache_field(
    extra: Mapping[str, Any],
    overrides: Mapping[str, Any],
    options: Mapping[str, Any],
    hires: bool = False,
    steps: int = 0,
) -> dict[str, Any]:
    """``{"cache": ...}`` for our request, or {} (no cache): the body's ``cache``, else the extension's
    options (override_settings first, then the caller's /options); ``hires``: the request has a
    second pass; ``steps``: its (first pass's) steps, which the start percentage is of."""
    if extra.get("cache") is not None:
        return {"cache": extra["cache"]}

    def option(name: str) -> tuple[Any, str]:
        if overrides.get(name) is not None:
            return overrides[name], f"override_settings.{name}"
        return options.get(name), name

    passes, where = option(PASS)
    if passes is not None:
        if passes not in PASSES:
            raise InputError(where, f"{PASS} must be one of {', '.join(PASSES)}", PASSES)
        if passes == "second pass" and hires:
            msg = f"{PASS} 'second pass' is not supported: the cache acts on both passes or none"
            raise InputError(where, msg, ["disable", "both passes"])
        if passes != "both passes":
            return {}
    else:
        enabled, where = option(ENABLE)
        if enabled is None or enabled is False:
            return {}
        if enabled is not True:
            raise InputError(where, f"{ENABLE} must be true or false")
    rate, where = option(RATE)
    rate = EXTENSION_RATE if rate is None else rate
    if isinstance(rate, float) and rate.is_integer():
        rate = int(rate)
    if isinstance(rate, bool) or not isinstance(rate, int) or not 1 <= rate <= 1000:
        raise InputError(where, f"{RATE} must be an integer in [1, 1000]", [1, 1000])
    share, where = option(START)
    share = EXTENSION_START if share is None else share
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
        raise InputError(where, f"{START} must be a number in [0, 1]", [0, 1])
    level, where = option(LEVEL)
    level = 0 if level is None else level  # the extension's default
    if isinstance(level, float) and level.is_integer():
        level = int(level)
    if isinstance(level, bool) or not isinstance(level, int) or level not in LEVELS:
        raise InputError(where, f"{LEVEL} must be an integer in [0, 10]", LEVELS)
    reuse, where = option(HR_REUSE)
    if reuse not in (None, True, False):
        raise InputError(where, f"{HR_REUSE} must be true or false")
    if reuse and hires:
        msg = (
            f"{HR_REUSE} is not supported: the hires pass runs at a new size, so its first evaluation "
            "is a full one and its cache is its own"
        )
        raise InputError(where, msg, [False])
    cache = {"method": "deepcache", "interval": rate, "start": int(share * steps), "level": level}
    return {"cache": cache}

"""A request's step cache (``cache: {"method", "interval" | "threshold"}``) and its per-row tensor.

Two training-free methods reuse what a network computed at an earlier evaluation of the same image:

- ``deepcache`` (UNets; Ma et al. 2023, arXiv 2312.00858): the deep part of the UNet (every level
  below the first) changes slowly between steps; a cached evaluation runs the first level's blocks
  down and up and takes the deep part's output from the last full evaluation. ``interval`` N: a full
  evaluation every N (the paper's uniform schedule); or ``threshold``: a full evaluation when the
  first level's features moved by more than that (relative mean absolute change) since the last one.
- ``fbcache`` (DiTs: SD3, Flux; First-Block-Cache / TeaCache): the first transformer block always
  runs; when its residual changed by less than ``threshold`` (relative) since the last full
  evaluation, the other blocks are skipped and their cached residual is added instead.

``start`` (either method): that many evaluations run in full before the cache may act (the sd-webui
extension's ``deepcache_cache_enable_step_percentage`` of the steps; 0 by default). ``level``
(deepcache on SD UNets): the split point, the extension's ``deepcache_cache_resnet_level``
(stepcache/sd_unet.py; default 1, DeepCache's split for SD; the project's own UNet has one split).

Each request's rows carry :data:`KEY`, a float64 ``[rows, 6]`` tensor of (row id, method, interval,
threshold, start, level); id 0 is a row without a cache. Every request of a model that can cache
carries it, so cached and uncached requests share model calls; the decision is made per row inside
the call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.sampling.errors import InputError

KEY = "cache"  # the conditioning key of the per-row cache tensor
METHODS = {"deepcache": 1, "fbcache": 2}  # method name -> its code in the row tensor
DEFAULTS: dict[str, dict[str, Any]] = {"deepcache": {"interval": 3}, "fbcache": {"threshold": 0.1}}
MAX_INTERVAL = 1000
MAX_THRESHOLD = 10.0
MAX_START = 10000
MAX_LEVEL = 12  # ComfyUI-DeepCache's cache_depth (A1111's slider: 10); past a UNet's last skip: its last
DEFAULT_LEVEL = 1  # DeepCache's split for SD (stepcache/sd_unet.py)
WIDTH = 6  # the row tensor's columns


@dataclass(frozen=True)
class CacheSpec:
    """One request's step cache (our API's ``cache`` object)."""

    method: str
    interval: int | None = None  # a full evaluation every ``interval`` (deepcache)
    threshold: float | None = None  # a full evaluation when the probe moved more than this
    start: int | None = None  # evaluations that run in full before the cache may act (None: 0)
    level: int | None = None  # deepcache on SD UNets: the split's skip (None: 1; stepcache/sd_unet.py)

    def resolved(self, methods: tuple[str, ...], field: str = "cache") -> CacheSpec:
        """This spec checked against what the model can run (``methods``), defaults filled in;
        InputError naming ``cache.<key>`` for what does not fit."""
        if self.method not in METHODS:
            raise InputError(f"{field}.method", f"unknown cache method {self.method!r}", sorted(METHODS))
        if self.method not in methods:
            allowed = list(methods)
            msg = f"this model cannot run cache method {self.method!r}"
            raise InputError(
                f"{field}.method", msg + (f"; it runs {', '.join(allowed)}" if allowed else ""), allowed
            )
        if self.interval is not None and self.threshold is not None:
            raise InputError(f"{field}.interval", "give interval or threshold, not both")
        if self.method == "fbcache" and self.interval is not None:
            raise InputError(f"{field}.interval", "fbcache decides by threshold only; omit interval")
        if self.interval is not None and not 1 <= self.interval <= MAX_INTERVAL:
            raise InputError(f"{field}.interval", f"interval must be an integer in [1, {MAX_INTERVAL}]")
        if self.threshold is not None and not 0.0 <= self.threshold <= MAX_THRESHOLD:
            raise InputError(f"{field}.threshold", f"threshold must be in [0, {MAX_THRESHOLD:g}]")
        if self.start is not None and not 0 <= self.start <= MAX_START:
            raise InputError(f"{field}.start", f"start must be an integer in [0, {MAX_START}]")
        if self.level is not None and self.method != "deepcache":
            raise InputError(f"{field}.level", "level is a deepcache setting; omit it")
        if self.level is not None and not 0 <= self.level <= MAX_LEVEL:
            raise InputError(
                f"{field}.level", f"level must be an integer in [0, {MAX_LEVEL}]", list(range(MAX_LEVEL + 1))
            )
        if self.interval is None and self.threshold is None:
            return CacheSpec(self.method, **DEFAULTS[self.method], start=self.start, level=self.level)
        return self

    def record(self) -> dict[str, Any]:
        """The recorded parameters (PNG, results): method and the setting that was used."""
        out: dict[str, Any] = {"method": self.method}
        if self.interval is not None:
            out["interval"] = self.interval
        if self.threshold is not None:
            out["threshold"] = self.threshold
        if self.start:
            out["start"] = self.start
        if self.level is not None:
            out["level"] = self.level
        return out

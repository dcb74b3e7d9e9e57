"""Step-cache model patches, as the community nodes workflows already carry them spell them:

- ``DeepCache`` (the ComfyUI-DeepCache node): ``cache_interval`` is our deepcache interval and
  ``cache_depth`` our ``level`` (the node breaks its input blocks after ``input_blocks[cache_depth]``
  and re-enters at ``output_blocks[len - cache_depth - 1]``: the same numbering; a depth past the
  UNet's last skip is its last, docs/STEP_CACHE.md). ``start_step`` and ``end_step`` are accepted
  with their ranges; the cache acts over every step.
- ``ApplyFBCacheOnModel`` (WaveSpeed's First-Block-Cache): ``residual_diff_threshold`` is our fbcache
  threshold (0: off, as there); ``object_to_patch``, ``start``, ``end`` and
  ``max_consecutive_cache_hits`` are accepted, the cache acting over every step.

The patched MODEL carries the request's ``cache`` (models/stepcache); a model that cannot run the
method refuses the prompt naming ``cache.method``.
"""

from __future__ import annotations

from typing import Any

from service.models.stepcache import CacheSpec

from .node import Float, In, Int, Str, node
from .runtime import NodeRun
from .values import ModelRef

MODEL = In("MODEL")


@node(
    "DeepCache",
    "model_patches",
    ["MODEL"],
    {
        "model": MODEL,
        "cache_interval": Int(5, 1, 1000),
        "cache_depth": Int(3, 0, 12),
        "start_step": Int(0, 0, 1000),
        "end_step": Int(1000, 0, 1000),
    },
)
async def deep_cache(
    rt: NodeRun, model: ModelRef, cache_interval: int, cache_depth: int, **_: Any
) -> tuple[Any, ...]:
    """DeepCache: a full UNet evaluation every ``cache_interval``, the part below ``cache_depth``
    reused between."""
    return (model.with_(cache=CacheSpec("deepcache", interval=cache_interval, level=cache_depth)),)


@node(
    "ApplyFBCacheOnModel",
    "wavespeed",
    ["MODEL"],
    {
        "model": MODEL,
        "object_to_patch": Str("diffusion_model", max_length=64),
        "residual_diff_threshold": Float(0.0, 0.0, 1.0, 0.001),
        "start": Float(0.0, 0.0, 1.0),
        "end": Float(1.0, 0.0, 1.0),
        "max_consecutive_cache_hits": Int(-1, -1, 1000),
    },
)
async def fb_cache(rt: NodeRun, model: ModelRef, residual_diff_threshold: float, **_: Any) -> tuple[Any, ...]:
    """First-Block-Cache on a DiT (SD3, Flux): the other blocks skipped while the first block's
    residual moved less than ``residual_diff_threshold`` (relative); 0 leaves the model as it is."""
    if residual_diff_threshold <= 0:
        return (model,)
    return (model.with_(cache=CacheSpec("fbcache", threshold=residual_diff_threshold)),)

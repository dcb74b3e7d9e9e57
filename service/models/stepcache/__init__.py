"""Step caching (DeepCache for UNets, First-Block-Cache for DiTs), decided per row in shared calls.

``spec.py``: a request's ``cache`` and its per-row tensor; ``state.py``: per-row state and the
decision inside one call; the networks call it at their split point (``models/unet.py``,
``dit.py`` for SD3 / Flux, ``sd_unet.py`` for diffusers UNets).
"""

from .spec import KEY, METHODS, CacheSpec
from .state import STORE, cache_rows, live, predicted_hit, release, run_cached

__all__ = [
    "KEY",
    "METHODS",
    "STORE",
    "CacheSpec",
    "cache_rows",
    "live",
    "predicted_hit",
    "release",
    "run_cached",
]

"""Which cache methods a loaded model's network runs (asked of the network, whatever wraps it)."""

from __future__ import annotations

from typing import Any

from torch import nn


def network(denoiser: Any) -> Any:
    """The denoiser's network, unwrapped from the trace / compile wrappers."""
    net = getattr(denoiser, "inner_model", None) or getattr(denoiser, "inner", None)
    while (
        net is not None
        and not hasattr(net, "cache_methods")
        and isinstance(getattr(net, "inner", None), nn.Module)
    ):
        net = net.inner
    return net


def cache_methods(denoiser: Any) -> tuple[str, ...]:
    """The cache methods the denoiser's network runs (``network.cache_methods()``), () if none."""
    net = network(denoiser)
    methods = getattr(net, "cache_methods", None)
    return tuple(methods()) if callable(methods) else ()

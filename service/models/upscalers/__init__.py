"""Upscaler models (ESRGAN, Real-ESRGAN compact, ...) from ``model_store/upscalers/``, run in tiles by
a batching thread per model; plus A1111's plain resizes and latent upscale modes. The interface:
:class:`Upscalers` (``ModelPool.upscalers``), see registry.py."""

from __future__ import annotations

from .registry import (
    PLAIN_UPSCALERS,
    UnknownUpscaler,
    UpscalerConfig,
    UpscalerInfo,
    UpscalerLoadError,
    Upscalers,
    UpscalerSettings,
)

# A1111's latent upscale modes (modules/shared.py latent_upscale_modes): name -> (F.interpolate mode,
# antialias), what /sdapi/v1/latent-upscale-modes lists and the hires fix interpolates latents with.
LATENT_UPSCALE_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}

__all__ = [
    "LATENT_UPSCALE_MODES",
    "PLAIN_UPSCALERS",
    "UnknownUpscaler",
    "UpscalerConfig",
    "UpscalerInfo",
    "UpscalerLoadError",
    "Upscalers",
    "UpscalerSettings",
]

"""Direct (engine-free) SD3 / Flux sampling: txt2img, img2img and inpainting in one call.

The same :func:`~service.models.sd_generate.generate` as Stable Diffusion's; a flow model's
defaults are sampler euler, schedule flow, cfg_scale 7 for SD3 and 1 (none) for Flux, and Flux-dev
takes ``guidance``.
"""

from __future__ import annotations

from .sd_generate import generate

__all__ = ["generate"]

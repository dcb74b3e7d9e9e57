"""The float <-> 8-bit conversions around the upscalers."""

from __future__ import annotations

import numpy as np
import torch

from service.models.upscalers.resize import from_pil, to_pil


def test_to_pil_in_row_chunks_rounds_as_the_whole_image_would() -> None:
    """Chunked (to bound the float copies of a large image), bit for bit the one-shot conversion,
    out-of-range values clamped, rows across chunk boundaries included."""
    x = torch.rand(1, 3, 700, 513, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.1
    whole = x[0].clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    for rows in (1, 256, 1000):
        assert np.array_equal(np.asarray(to_pil(x, rows)), whole), rows
    assert np.array_equal(np.asarray(to_pil(from_pil(to_pil(x)))), whole)

"""The model runner: what the engine needs from a loaded model, and the batched denoiser call."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)


@dataclass
class ModelHandle:
    """A denoiser model as the engine sees it: ``denoiser(x, sigma[B], **cond) -> denoised``.

    ``latent_shape`` is the per-image shape the sampler works in; ``decode`` (optional) turns
    sampled latents into images in [-1, 1] (a VAE for latent models; None for pixel models).
    ``row_adapters`` (optional) takes the per-row adapter tensor of a call (conditioning key
    :data:`ROW_ADAPTERS`, not passed to the denoiser) and returns the context the call runs in: per-row
    LoRA, so rows with different adapters share one call. ``forget`` (optional) drops what the
    model keeps per row between calls (the step cache) for a job's conditioning dicts; the engine
    calls it when the job ends (thread-safe: a call still running then cannot bring them back).
    ``cache_hits`` (optional) guesses from a job's conditioning whether its next evaluation reuses its
    step cache; the scheduler puts those rows first in their calls (models/stepcache.predicted_hit).
    """

    name: str
    denoiser: Any
    latent_shape: tuple[int, ...]
    device: torch.device
    dtype: torch.dtype
    decode: Callable[[Tensor], Tensor] | None = None
    row_adapters: Callable[[Tensor], AbstractContextManager[None]] | None = None
    forget: Callable[[list[dict[str, Tensor] | None]], None] | None = None
    cache_hits: Callable[[dict[str, Tensor]], bool] | None = None


ROW_ADAPTERS = "lora"  # the conditioning key of per-row adapters


class ModelRunner:
    """Runs the denoiser on packed rows (no grad), chunking calls above ``max_rows``.

    Batch-invariant mode (``chunk_rows``, the engine's ``invariant_rows``): every denoiser call has
    exactly ``chunk_rows`` rows (the last chunk padded with copies of its last row, whose outputs
    are dropped). A model's float rounding depends on the shape of its call (the kernels and their
    blocking are chosen by the batch size), not on where a row sits in it or on its neighbours'
    values, so with the shape fixed a row's output is bit for bit the same whatever shares its call:
    the same seed gives the same image alone or batched (tests/engine/test_batch_invariance.py
    checks both halves of that on the digits UNet, eager and traced). The price is the padding and
    the smaller calls (docs/BENCHMARKS.md).

    Out of memory, it halves its chunk size and retries, and keeps the smaller size: a batch too big
    for the device slows down instead of failing its jobs, and later calls do not hit the same wall
    (in batch-invariant mode images stay invariant among calls made at the new size).
    """

    def __init__(self, handle: ModelHandle, max_rows: int, chunk_rows: int | None = None) -> None:
        if chunk_rows is not None and chunk_rows < 1:
            raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
        self.handle, self.max_rows = handle, max_rows
        self.chunk_rows = None if chunk_rows is None else min(chunk_rows, max_rows)

    @torch.inference_mode()
    def denoise(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor]) -> Tensor:
        while True:
            try:
                if self.chunk_rows is not None:
                    return self._fixed(x, sigma, cond, self.chunk_rows)
                return self._chunked(x, sigma, cond)
            except torch.OutOfMemoryError:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()  # give the failed call's blocks back before retrying
                rows = min(self.max_rows, x.shape[0]) if self.chunk_rows is None else self.chunk_rows
                if rows <= 1:
                    raise
                self.max_rows = rows // 2
                if self.chunk_rows is not None:
                    self.chunk_rows = rows // 2
                log.warning(
                    "%s: out of memory at %d rows per call; now at most %d",
                    self.handle.name,
                    rows,
                    self.max_rows,
                )

    def _chunked(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor]) -> Tensor:
        size = self.max_rows
        if x.shape[0] <= size:
            return self._call(x, sigma, cond)
        outs = []
        for i in range(0, x.shape[0], size):
            part = slice(i, i + size)
            outs.append(self._call(x[part], sigma[part], {k: v[part] for k, v in cond.items()}))
        return torch.cat(outs)

    def _fixed(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor], size: int) -> Tensor:
        """Calls of exactly ``size`` rows each (batch-invariant mode)."""
        rows = x.shape[0]
        pad = -rows % size
        if pad:  # copies of a real row: padding stays finite and valid for any model
            index = torch.cat([torch.arange(rows), torch.full([pad], rows - 1)]).to(x.device)
            x, sigma = x.index_select(0, index), sigma.index_select(0, index)
            cond = {k: v.index_select(0, index.to(v.device)) for k, v in cond.items()}
        outs = []
        for i in range(0, rows + pad, size):
            part = slice(i, i + size)
            outs.append(self._call(x[part], sigma[part], {k: v[part] for k, v in cond.items()}))
        return torch.cat(outs)[:rows]

    def _call(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor]) -> Tensor:
        rows = cond.get(ROW_ADAPTERS)
        if rows is None:
            return self.handle.denoiser(x, sigma, **cond)  # type: ignore[no-any-return]
        cond = {k: v for k, v in cond.items() if k != ROW_ADAPTERS}
        if self.handle.row_adapters is None:
            raise RuntimeError(f"{self.handle.name}: rows carry adapters but the model has no adapter hook")
        with self.handle.row_adapters(rows):
            return self.handle.denoiser(x, sigma, **cond)  # type: ignore[no-any-return]

    @torch.inference_mode()
    def decode(self, latents: Tensor) -> Tensor:
        images = latents if self.handle.decode is None else self.handle.decode(latents)
        return images.detach().float().cpu()

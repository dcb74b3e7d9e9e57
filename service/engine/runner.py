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
    ``row_bound`` (optional) says whether a call with this conditioning has rows bound to something
    beyond their inputs (a live per-row LoRA, per-row state the model keeps such as a live step cache):
    such a call runs exactly as planned, never widened or run twice. Without it, a call with the per-row
    adapter key counts as bound.
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
    row_bound: Callable[[dict[str, Tensor]], bool] | None = None


ROW_ADAPTERS = "lora"  # the conditioning key of per-row adapters
WIDE_SHAPES = 4096  # call shapes whose wide-call check the runner remembers


def _free_device_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # a failed call's blocks back before the next one


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

    Wide calls: many kernels give each row the same bits at every multiple of the chunk size (the
    traced digits UNet with torch's two CPU threads does at 16, 24, ... 128 rows), but not all, and
    not on every device or thread count. So the first time a padded call of ``k`` chunks comes with
    given input shapes, the runner runs it both ways, keeps the chunked result, and records whether the
    one-call result was bit for bit equal on every row; from then on calls of that shape run as one
    call when it was. Rows therefore stay bit-equal to their chunked (and so to their solo) result,
    and a device or model whose kernels differ keeps the chunks. Calls with live per-row adapters or
    per-row model state (``ModelHandle.row_bound``) always run as chunks.

    Out of memory, it halves its chunk size and retries, and keeps the smaller size: a batch too big
    for the device slows down instead of failing its jobs, and later calls do not hit the same wall
    (in batch-invariant mode images stay invariant among calls made at the new size).
    """

    def __init__(
        self,
        handle: ModelHandle,
        max_rows: int,
        chunk_rows: int | None = None,
        observe: Callable[[int], None] | None = None,
    ) -> None:
        """``observe`` (optional) is told the rows of each network call as run (metrics)."""
        if chunk_rows is not None and chunk_rows < 1:
            raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
        self.handle, self.max_rows, self.observe = handle, max_rows, observe
        self.chunk_rows = None if chunk_rows is None else min(chunk_rows, max_rows)
        # batch-invariant mode: per call shape (rows, trailing shapes, dtypes, device), whether one
        # call gave every row the bits of the chunked calls (None: not tried yet)
        self.wide: dict[tuple[object, ...], bool] = {}

    @torch.inference_mode()
    def denoise(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor]) -> Tensor:
        while True:
            try:
                if self.chunk_rows is not None:
                    return self._fixed(x, sigma, cond, self.chunk_rows)
                return self._chunked(x, sigma, cond)
            except torch.OutOfMemoryError:
                _free_device_cache()
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
        """Calls of exactly ``size`` rows each (batch-invariant mode), or one call of a multiple of
        ``size`` rows where that shape was seen to give every row the same bits (class docstring)."""
        rows = x.shape[0]
        pad = -rows % size
        if pad:  # copies of a real row: padding stays finite and valid for any model
            index = torch.cat([torch.arange(rows), torch.full([pad], rows - 1)]).to(x.device)
            x, sigma = x.index_select(0, index), sigma.index_select(0, index)
            cond = {k: v.index_select(0, index.to(v.device)) for k, v in cond.items()}
        key = self._wide_key(x, cond, size)
        seen = None if key is None else self.wide.get(key)
        if key is not None and seen:
            try:
                return self._call(x, sigma, cond)[:rows]
            except Exception as exc:  # out of memory as one call (a CPU allocation failure is a plain
                # RuntimeError): chunks again, the chunk size kept; a fault of the rows fails there too
                _free_device_cache()
                log.warning(
                    "%s: a wide call of %d rows failed (%s); back to chunks",
                    self.handle.name,
                    x.shape[0],
                    exc,
                )
                self.wide[key] = seen = False
        outs = []
        for i in range(0, rows + pad, size):
            part = slice(i, i + size)
            outs.append(self._call(x[part], sigma[part], {k: v[part] for k, v in cond.items()}))
        out = torch.cat(outs)
        if key is not None and seen is None:
            if len(self.wide) >= WIDE_SHAPES:  # a bound: models with free image sizes see many shapes
                del self.wide[next(iter(self.wide))]  # the oldest; seeing it again re-checks it
            self.wide[key] = self._same_wide(x, sigma, cond, out, size)
        return out[:rows]

    def _wide_key(self, x: Tensor, cond: dict[str, Tensor], size: int) -> tuple[object, ...] | None:
        """The shape key of a padded call that may run as one call, None if it may not."""
        if not size < x.shape[0] <= self.max_rows:
            return None
        bound = self.handle.row_bound
        if (ROW_ADAPTERS in cond) if bound is None else bound(cond):
            return None
        conds = tuple((k, tuple(v.shape[1:]), v.dtype) for k, v in sorted(cond.items()))
        return (x.shape[0], size, tuple(x.shape[1:]), x.dtype, x.device, conds)

    def _same_wide(
        self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor], chunked: Tensor, size: int
    ) -> bool:
        """Run the padded call as one call and compare it, bit for bit, with its chunked result."""
        try:
            same = torch.equal(self._call(x, sigma, cond), chunked)
        except Exception as exc:  # the check is extra work: it never fails the call (its result is in)
            _free_device_cache()
            log.warning("%s: the one-call check of %d rows failed: %s", self.handle.name, x.shape[0], exc)
            same = False
        log.info(
            "%s: a call of %d rows (inputs %s) %s",
            self.handle.name,
            x.shape[0],
            tuple(x.shape[1:]),
            f"gives every row the bits of {size}-row calls: such calls now run as one"
            if same
            else f"differs from {size}-row calls: such calls stay in {size}-row chunks",
        )
        return same

    def _call(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor]) -> Tensor:
        if self.observe is not None:
            self.observe(x.shape[0])
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

"""Large images in tiles, so the memory of one model call is bounded by the tile size.

The image is cut into cells of ``tile`` x ``tile`` pixels. Each cell is upscaled inside a window that
adds ``overlap`` pixels of real image context on every side that has any (a window is shifted inward
at the image's edges instead of shrinking), and only the cell's part of the window's output is kept:
no blending, so where the overlap covers the network's receptive field the tiled result equals the
untiled one, and elsewhere the seams see ``overlap`` pixels of context. Every window of an image at
least ``tile + 2 * overlap`` on a side has the same shape, so windows of different requests (and
images) batch into one model call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Span:
    """One axis of a cell ([start, stop)) and of its window ([wstart, wstop))."""

    start: int
    stop: int
    wstart: int
    wstop: int


def spans(length: int, tile: int, overlap: int, align: int = 1) -> list[Span]:
    """The cells along one axis and their windows; ``tile`` <= 0 = one cell of the whole length.
    ``align`` > 1 (a pixel-unshuffling net): windows start on multiples of it and those short of the end
    are multiples of it long, so each window sees the unshuffle grid the whole image would."""
    if tile <= 0 or length <= tile:
        return [Span(0, length, 0, length)]
    tile, overlap = -(-tile // align) * align, -(-overlap // align) * align
    window = min(tile + 2 * overlap, length)
    out = []
    for start in range(0, length, tile):
        stop = min(start + tile, length)
        wstart = min(max(start - overlap, 0), length - window) // align * align
        wstop = length if wstart + window > length - align else wstart + window
        out.append(Span(start, stop, wstart, wstop))
    return out


def windows(h: int, w: int, tile: int, overlap: int, align: int = 1) -> Iterator[tuple[Span, Span]]:
    for ys in spans(h, tile, overlap, align):
        for xs in spans(w, tile, overlap, align):
            yield ys, xs


Submit = Callable[[Tensor], "Future[Tensor]"]


def upscale_tiled(
    x: Tensor, scale: int, submit: Submit, tile: int, overlap: int, align: int = 1, in_flight: int = 8
) -> Tensor:
    """[B, 3, H, W] -> [B, 3, H*scale, W*scale]: each window handed to ``submit`` (which returns a
    future of its [1, 3, h*scale, w*scale] output), at most ``in_flight`` outstanding at a time so a
    large image does not queue all its windows' outputs at once."""
    b, c, h, w = x.shape
    out = torch.empty(b, c, h * scale, w * scale, dtype=torch.float32, device=x.device)
    jobs = [(i, ys, xs) for i in range(b) for ys, xs in windows(h, w, tile, overlap, align)]
    pending: list[tuple[int, Span, Span, Future[Tensor]]] = []

    def place(i: int, ys: Span, xs: Span, fut: Future[Tensor]) -> None:
        res = fut.result()
        ry, rx = (ys.start - ys.wstart) * scale, (xs.start - xs.wstart) * scale
        hh, ww = (ys.stop - ys.start) * scale, (xs.stop - xs.start) * scale
        out[i, :, ys.start * scale : ys.stop * scale, xs.start * scale : xs.stop * scale] = res[
            0, :, ry : ry + hh, rx : rx + ww
        ].to(out.device, torch.float32)

    try:
        for i, ys, xs in jobs:
            if len(pending) >= in_flight:
                place(*pending.pop(0))
            crop = x[i : i + 1, :, ys.wstart : ys.wstop, xs.wstart : xs.wstop]
            pending.append((i, ys, xs, submit(crop)))
        while pending:
            place(*pending.pop(0))
    finally:
        for *_, fut in pending:  # an error part-way: the rest are not waited for
            fut.cancel()
    return out

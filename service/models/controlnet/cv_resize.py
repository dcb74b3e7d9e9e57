"""Image and map resizing with OpenCV's ``resize`` sampling rules, in numpy (no OpenCV at run time).

The OpenPose annotator as A1111's extension and controlnet_aux run it resizes with
``INTER_AREA`` when shrinking and ``INTER_LANCZOS4`` when growing, and its peaks and limbs are read
off those resized maps, so the sampling must be OpenCV's to land on the same pixels. Each resize is
separable: one weight matrix per axis, ``out = Wy @ img @ Wx.T``. The rules (OpenCV's documented
behaviour):

- Bicubic: as Lanczos-4 but 4 taps ``floor(f) - 1 .. floor(f) + 2`` of Keys' kernel, a = -0.75.
- Lanczos-4: output pixel ``d`` reads source ``f = (d + 0.5) * s - 0.5`` (``s = in / out``,
  computed in float32 as OpenCV does), 8 taps ``floor(f) - 3 .. floor(f) + 4`` weighted by
  ``sinc(t) sinc(t / 4)`` normalised to sum 1, the border replicated.
- Area, shrinking on both axes: each output pixel is the mean of the source area it covers
  (fractional cells weighted by their overlap).
- Area with an axis that grows: OpenCV falls back to a 2-tap linear rule whose fraction is the
  overlap ``(d + 1) - (floor(d * s) + 1) / s``, clamped at 0.
- 8-bit images go through fixed point as OpenCV's 8-bit path does for the interpolating modes
  (weights rounded to 1/2048, the result rounded half up from 22 fraction bits); the area mode
  sums in float32, taps in source order, rows after columns, and rounds half to even (an exact
  2x2 halving: the mean of 4, halves up), so the same bytes come out.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

AREA, CUBIC, LANCZOS4 = "area", "cubic", "lanczos4"
CUBIC_A = -0.75  # OpenCV's bicubic kernel parameter
_COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS


def _lanczos4(fx: np.ndarray) -> np.ndarray:
    """The 8 normalised Lanczos-4 weights for each fraction in [0, 1) ([n, 8], float32)."""
    x = fx.astype(np.float64)[:, None]
    t = x + 3 - np.arange(8)[None, :]  # distance from each tap
    y = -t * math.pi / 4
    with np.errstate(divide="ignore", invalid="ignore"):
        # sin(pi t) sin(pi t / 4) / (pi t / 4)^2 up to a common factor: the normalisation removes it
        w = np.sin(math.pi * t) * np.sin(math.pi * t / 4) / (y * y)
    w = w.astype(np.float32)
    w /= w.sum(axis=1, dtype=np.float32, keepdims=True)
    exact = fx < np.finfo(np.float32).eps  # an integer position reads its own pixel only
    w[exact] = np.eye(8, dtype=np.float32)[3]
    return w


def _cubic(fx: np.ndarray) -> np.ndarray:
    """The 4 bicubic weights for each fraction (float32, the last one closing the sum to 1)."""
    a, x = np.float32(CUBIC_A), fx.astype(np.float32)
    c0 = ((a * (x + 1) - 5 * a) * (x + 1) + 8 * a) * (x + 1) - 4 * a
    c1 = ((a + 2) * x - (a + 3)) * x * x + 1
    c2 = ((a + 2) * (1 - x) - (a + 3)) * (1 - x) * (1 - x) + 1
    return np.stack([c0, c1, c2, 1 - c0 - c1 - c2], axis=1).astype(np.float32)


def _taps(n_in: int, first: np.ndarray, weights: np.ndarray, fixed: bool) -> np.ndarray:
    """Scatter per-output taps ``first + k`` (clamped to the border) into an [out, in] matrix;
    ``fixed``: each tap's weight in 1/2048 units, rounded before taps on one border pixel add up."""
    n_out, k = weights.shape
    if fixed:
        weights = np.rint(weights.astype(np.float64) * (1 << _COEF_BITS))
    mat = np.zeros((n_out, n_in), np.float64)
    idx = np.clip(first[:, None] + np.arange(k)[None, :], 0, n_in - 1)
    np.add.at(mat, (np.repeat(np.arange(n_out), k), idx.ravel()), weights.astype(np.float64).ravel())
    return mat


def _area_shrink(n_in: int, n_out: int) -> np.ndarray:
    """Each output cell's mean over the source cells it overlaps."""
    scale = n_in / n_out
    mat = np.zeros((n_out, n_in), np.float64)
    for d in range(n_out):
        f1 = d * scale
        f2 = f1 + scale
        cell = min(scale, n_in - f1)
        s2 = min(math.floor(f2), n_in - 1)
        s1 = min(math.ceil(f1), s2)
        if s1 - f1 > 1e-3:
            mat[d, s1 - 1] += np.float32((s1 - f1) / cell)
        mat[d, s1:s2] += np.float32(1.0 / cell)
        if f2 - s2 > 1e-3:
            mat[d, s2] += np.float32(min(f2 - s2, 1.0, cell) / cell)
    return mat


@lru_cache(maxsize=64)
def _axis(n_in: int, n_out: int, method: str, shrink_both: bool, fixed: bool = False) -> np.ndarray:
    """The [n_out, n_in] weights of one axis (read-only, cached: maps come in few sizes);
    ``fixed``: the 8-bit path's integer weights (x 2048)."""
    inv = n_out / n_in
    scale = 1.0 / inv
    d = np.arange(n_out, dtype=np.float64)
    if method == AREA and shrink_both:
        mat = _area_shrink(n_in, n_out)
    elif method == AREA:
        first = np.floor(d * scale).astype(np.int64)
        fx = ((d + 1) - (first + 1) * inv).astype(np.float32)
        fx = np.where(fx <= 0, np.float32(0), fx - np.floor(fx)).astype(np.float32)
        mat = _taps(n_in, first, np.stack([1 - fx, fx], axis=1), fixed)
    else:
        f = ((d + 0.5) * scale - 0.5).astype(np.float32)
        first = np.floor(f).astype(np.int64)
        frac = (f - first).astype(np.float32)
        if method == CUBIC:
            mat = _taps(n_in, first - 1, _cubic(frac), fixed)
        else:
            mat = _taps(n_in, first - 3, _lanczos4(frac), fixed)
    mat.setflags(write=False)
    return mat


def _mats(
    shape: tuple[int, int], height: int, width: int, method: str, fixed: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    h, w = shape
    shrink_both = height <= h and width <= w
    return _axis(h, height, method, shrink_both, fixed), _axis(w, width, method, shrink_both, fixed)


def resize_maps(maps: np.ndarray, height: int, width: int, method: str) -> np.ndarray:
    """Float maps [H, W] or [H, W, C] to [height, width(, C)] (float64)."""
    if maps.shape[:2] == (height, width):
        return maps.astype(np.float64)
    h, w = maps.shape[:2]
    shrink_both = height <= h and width <= w
    (yi, yw), (xi, xw) = _axis_taps(h, height, method, shrink_both), _axis_taps(w, width, method, shrink_both)
    x = maps.astype(np.float64)
    extra = (None,) * (x.ndim - 2)  # gathered taps (8 at most) instead of dense products
    rows = sum(x[yi[:, j]] * yw[(slice(None), j, None, *extra)] for j in range(yi.shape[1]))
    return sum(rows[:, xi[:, j]] * xw[(None, slice(None), j, *extra)] for j in range(xi.shape[1]))


def resize_u8(img: np.ndarray, height: int, width: int, method: str) -> np.ndarray:
    """An 8-bit image [H, W, C] to [height, width, C] with OpenCV's 8-bit rounding."""
    if img.shape[:2] == (height, width):
        return img.copy()
    h, w = img.shape[:2]
    if method == AREA and height <= h and width <= w:
        if h == 2 * height and w == 2 * width:  # OpenCV's vectorised 2x2 mean rounds halves up
            out = resize_maps(img, height, width, method)
            return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)
        return _area_u8(img, height, width)
    my, mx = _mats(img.shape[:2], height, width, method, fixed=True)
    iy = my.astype(np.int64)
    # integer weights times bytes: float64 products and sums stay exact (< 2^53), and BLAS is fast
    cols = np.swapaxes(np.tensordot(mx, img.astype(np.float64), axes=(1, 1)), 0, 1).astype(np.int64)
    if method == AREA:
        # the 2-tap vertical pass in OpenCV's vectorised 8-bit form: 4 bits dropped before the
        # 16-bit high multiply, then 2 more bits rounded off
        out = np.zeros((height, *cols.shape[1:]), np.int64)
        nz = [np.nonzero(row)[0] for row in iy]
        for d, taps in enumerate(nz):
            out[d] = sum(((cols[t] >> 4) * iy[d, t]) >> 16 for t in taps)
        return np.clip((out + 2) >> 2, 0, 255).astype(np.uint8)
    both = np.tensordot(my, cols.astype(np.float64), axes=(1, 0)).astype(np.int64)
    half = 1 << (2 * _COEF_BITS - 1)
    return np.clip((both + half) >> (2 * _COEF_BITS), 0, 255).astype(np.uint8)


def _tap_form(mat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A weight matrix as per-output taps in source order: indices and weights (padded with zero
    weights)."""
    rows = [np.nonzero(r)[0] for r in mat]
    n = max(len(r) for r in rows)
    idx = np.zeros((len(rows), n), np.int64)
    wts = np.zeros((len(rows), n), mat.dtype)
    for d, nz in enumerate(rows):
        idx[d, : len(nz)], wts[d, : len(nz)] = nz, mat[d, nz]
    return idx, wts


@lru_cache(maxsize=64)
def _axis_taps(n_in: int, n_out: int, method: str, shrink_both: bool) -> tuple[np.ndarray, np.ndarray]:
    """One axis' weights in tap form (float64)."""
    return _tap_form(_axis(n_in, n_out, method, shrink_both))


def _area_u8(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """The area mean of an 8-bit image in float32, summed in OpenCV's order."""
    my, mx = _mats(img.shape[:2], height, width, AREA)
    (yi, yw), (xi, xw) = _tap_form(my), _tap_form(mx)
    yw, xw = yw.astype(np.float32), xw.astype(np.float32)  # the weights are float32 values
    src = img.astype(np.float32)
    if src.ndim == 2:
        src = src[:, :, None]
    rows = np.zeros((src.shape[0], width, src.shape[2]), np.float32)
    for j in range(xi.shape[1]):
        rows = rows + src[:, xi[:, j]] * xw[None, :, j, None]
    out = rows[yi[:, 0]] * yw[:, 0, None, None]
    for j in range(1, yi.shape[1]):
        out = out + rows[yi[:, j]] * yw[:, j, None, None]
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out.reshape(height, width, *img.shape[2:])


def resize_maps_twice(
    maps: np.ndarray,
    first: tuple[int, int, str],
    second: tuple[int, int, str],
    crop: tuple[int, int] | None = None,
) -> np.ndarray:
    """Two resizes of float maps [H, W, C] as one, the top-left ``crop`` (height, width) of the
    first result taken in between: ``first`` and ``second`` are (height, width, method). The
    axes' weight matrices are multiplied first, so a large middle size costs nothing; equal to
    resizing twice up to float rounding. Returns [height, width, C] float64."""
    h, w = maps.shape[:2]
    (h1, w1, m1), (h2, w2, m2) = first, second
    ch, cw = crop or (h1, w1)
    s1, s2 = h1 <= h and w1 <= w, h2 <= ch and w2 <= cw
    my = _composed(h, h1, ch, h2, m1, m2, s1, s2)
    mx = _composed(w, w1, cw, w2, m1, m2, s1, s2)
    x = np.ascontiguousarray(np.moveaxis(maps.astype(np.float64), -1, 0))  # [C, H, W]: BLAS per map
    out = np.matmul(np.matmul(my, x), mx.T)
    return np.moveaxis(out, 0, -1)


@lru_cache(maxsize=64)
def _composed(n: int, n1: int, c: int, n2: int, m1: str, m2: str, s1: bool, s2: bool) -> np.ndarray:
    """One axis of two resizes (keeping the first ``c`` of the middle size) as one matrix."""
    mat = _axis(c, n2, m2, s2) @ _axis(n, n1, m1, s1)[:c]
    mat.setflags(write=False)
    return mat


def method_for(h: int, w: int, height: float, width: float) -> str:
    """The annotator's choice: area when the sizes shrink on the whole, Lanczos-4 when they grow."""
    return AREA if (height + width) / (h + w) < 1 else LANCZOS4

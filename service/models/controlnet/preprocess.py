"""ControlNet preprocessors that need no downloaded weights (numpy / Pillow), and the control
image's resize to the generation size, as the sd-webui-controlnet extension does them.

Each module takes an RGB uint8 array [H, W, 3] and the unit's ``threshold_a`` / ``threshold_b``
(None: the module's default) and returns an RGB uint8 array. ``fit`` resizes a control image to
the request size by A1111's resize modes: "Just Resize" (stretch), "Crop and Resize" (cover, centre
crop; the default) and "Resize and Fill" (fit inside, the rest filled with the border's median).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from service.sampling.errors import InputError

from . import annotators
from .annotator_cache import Device

Array = np.ndarray
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")


def _gray(img: Array) -> Array:
    return np.asarray(Image.fromarray(img).convert("L"), dtype=np.float32)


def _rgb(gray: Array) -> Array:
    g = np.clip(gray, 0, 255).astype(np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)


def _conv(a: Array, k: Array) -> Array:
    """Same-size 2-D correlation with edge padding (small kernels)."""
    ph, pw = k.shape[0] // 2, k.shape[1] // 2
    p = np.pad(a, ((ph, ph), (pw, pw)), mode="edge")
    out = np.zeros_like(a)
    for i in range(k.shape[0]):
        for j in range(k.shape[1]):
            out += k[i, j] * p[i : i + a.shape[0], j : j + a.shape[1]]
    return out


def canny(img: Array, low: float | None, high: float | None) -> Array:
    """Canny edges (white on black): Gaussian blur, Sobel gradients, non-maximum suppression along
    the gradient direction, then hysteresis from the strong edges (``low`` / ``high``: 100 / 200)."""
    lo, hi = (100.0 if low is None else low), (200.0 if high is None else high)
    g = _conv(_gray(img), np.outer(*(2 * [np.array([1, 4, 6, 4, 1], np.float32) / 16])))
    gx = _conv(g, np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32))
    gy = _conv(g, np.array([[-1, -2, -1], [0, 0, 0], [1, 2, 1]], np.float32))
    mag = np.hypot(gx, gy)
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180) % 180
    sector = (
        np.digitize(angle, [22.5, 67.5, 112.5, 157.5]) % 4
    )  # 0: horizontal gradient, 1: 45, 2: 90, 3: 135
    p = np.pad(mag, 1)
    h, w = mag.shape
    nb = {0: ((0, 1), (0, -1)), 1: ((1, 1), (-1, -1)), 2: ((1, 0), (-1, 0)), 3: ((1, -1), (-1, 1))}
    keep = np.zeros_like(mag, dtype=bool)
    for s, ((a0, a1), (b0, b1)) in nb.items():
        n1 = p[1 + a0 : 1 + a0 + h, 1 + a1 : 1 + a1 + w]
        n2 = p[1 + b0 : 1 + b0 + h, 1 + b1 : 1 + b1 + w]
        keep |= (sector == s) & (mag >= n1) & (mag >= n2)
    thin = np.where(keep, mag, 0)
    strong, weak = thin >= hi, thin >= lo
    edges = strong.copy()
    while True:  # grow strong edges through 8-connected weak pixels
        grown = np.pad(edges, 1)
        near = np.zeros_like(edges)
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                near |= grown[1 + di : 1 + di + h, 1 + dj : 1 + dj + w]
        new = weak & near & ~edges
        if not new.any():
            break
        edges |= new
    return _rgb(edges * 255.0)


def threshold(img: Array, a: float | None, b: float | None) -> Array:
    """Binarise the greyscale image at ``a`` (127)."""
    return _rgb((_gray(img) > (127.0 if a is None else a)) * 255.0)


def invert(img: Array, a: float | None, b: float | None) -> Array:
    """White background, black lines -> black background, white lines."""
    return (255 - img.astype(np.int16)).astype(np.uint8)


def blur(img: Array, a: float | None, b: float | None) -> Array:
    """Gaussian blur of radius ``a`` (9)."""
    radius = 9.0 if a is None else a
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius)))


def tile_resample(img: Array, a: float | None, b: float | None) -> Array:
    """Down-sample by ``a`` (1 = unchanged); the ControlNet tile model fills the detail back in."""
    rate = 1.0 if a is None else max(a, 1.0)
    h, w = img.shape[:2]
    small = Image.fromarray(img).resize(
        (max(1, round(w / rate)), max(1, round(h / rate))), Image.Resampling.LANCZOS
    )
    return np.asarray(small)


def scribble(img: Array, a: float | None, b: float | None) -> Array:
    """A user's scribble: dark strokes on white (or white on black) -> white strokes on black."""
    g = _gray(img)
    lines = g < 127 if g.mean() > 127 else g > 127
    return _rgb(lines * 255.0)


def shuffle(img: Array, a: float | None, b: float | None) -> Array:
    """Content shuffle: pixels moved along a smooth random flow (seed ``a``, default 0)."""
    h, w = img.shape[:2]
    rng = np.random.default_rng(int(a or 0))
    f = 256
    coarse = rng.random((2, max(2, h // f + 2), max(2, w // f + 2))).astype(np.float32)
    flow = [np.asarray(Image.fromarray(c).resize((w, h), Image.Resampling.BICUBIC)) for c in coarse]
    ys = np.clip((flow[0] * h).astype(np.int64), 0, h - 1)
    xs = np.clip((flow[1] * w).astype(np.int64), 0, w - 1)
    return img[ys, xs]


Module = Callable[[Array, "float | None", "float | None"], Array]
MODULES: dict[str, Module | None] = {
    "none": None,
    "canny": canny,
    "threshold": threshold,
    "invert": invert,
    "scribble_hed": scribble,
    "scribble": scribble,
    "blur_gaussian": blur,
    "tile_resample": tile_resample,
    "shuffle": shuffle,
}
# the module each A1111 control type uses by default (/controlnet/control_types)
CONTROL_TYPES = {
    "All": ("none", list(MODULES)),
    "Canny": ("canny", ["none", "canny", "invert"]),
    "Scribble/Sketch": ("scribble", ["none", "scribble", "scribble_hed", "threshold", "invert"]),
    "Tile/Blur": ("tile_resample", ["none", "tile_resample", "blur_gaussian"]),
    "Shuffle": ("shuffle", ["none", "shuffle"]),
}


def modules(root: Path | None = None) -> list[str]:
    """Every module a unit may name: the weight-free ones, then those whose weights are in the
    store at ``root`` (``annotators``)."""
    return [*MODULES, *(annotators.available(root) if root is not None else [])]


def module_name(name: str, root: Path | None = None) -> str | None:
    """A module's canonical name (A1111's aliases too: "invert (from white bg & black line)")."""
    key = name.strip().lower().split(" (")[0]
    key = {"tile_gaussian": "blur_gaussian", "scribble_pidinet": "scribble"}.get(key, key)
    return key if key in modules(root) else None


def run(
    name: str,
    img: Array,
    resolution: int | None,
    a: float | None,
    b: float | None,
    root: Path | None = None,
    field: str = "module",
    device: Device = None,
) -> Array:
    """Run a module at ``resolution`` (the short side; None: the image's own); a model-based one
    with its weights from the store at ``root`` (a weight file that is not what its name says:
    the 422 on ``field`` naming it), its networks on ``device`` where they run there (the
    service's model device; None: the CPU)."""
    if name == "none":
        return img
    if root is not None and name in annotators.SCALES_ITSELF:  # scaled as the A1111 extension does
        try:
            return annotators.run(root, name, img, resolution, device)
        except annotators.WeightsError as exc:
            raise InputError(field, f"{name}: {exc}", modules(root)) from exc
    if resolution:
        h, w = img.shape[:2]
        k = resolution / min(h, w)
        if abs(k - 1) > 1e-6:
            size = (max(1, round(w * k)), max(1, round(h * k)))
            img = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.LANCZOS))
    fn = MODULES.get(name)
    if fn is not None:
        return fn(img, a, b)
    if root is None:
        raise KeyError(name)
    return annotators.run(root, name, img)


def _resize(img: Array, w: int, h: int) -> Array:
    if img.shape[1] == w and img.shape[0] == h:
        return img
    small = w * h < img.shape[0] * img.shape[1]  # area-like when shrinking, Lanczos when growing
    method = Image.Resampling.BOX if small else Image.Resampling.LANCZOS
    return np.asarray(Image.fromarray(img).resize((w, h), method))


def fit(img: Array, width: int, height: int, mode: int) -> Array:
    """Resize a control image to ``width`` x ``height`` by resize mode 0, 1 or 2 (RESIZE_MODES)."""
    if mode == 0:
        return _resize(img, width, height)
    oh, ow = img.shape[:2]
    k = (min if mode == 2 else max)(height / oh, width / ow)
    nw, nh = max(1, round(ow * k)), max(1, round(oh * k))
    scaled = _resize(img, nw, nh)
    if mode == 1:
        top, left = max(0, (nh - height) // 2), max(0, (nw - width) // 2)
        return np.ascontiguousarray(scaled[top : top + height, left : left + width])
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]], axis=0)
    out = np.tile(np.median(border, axis=0).astype(np.uint8)[None, None], (height, width, 1))
    top, left = max(0, (height - nh) // 2), max(0, (width - nw) // 2)
    out[top : top + nh, left : left + nw] = scaled[: height - top, : width - left]
    return out


def pixel_perfect_resolution(raw_h: int, raw_w: int, height: int, width: int, mode: int) -> int:
    """The preprocessor resolution that lands the result on the generation size (A1111's
    pixel perfect): the scale the resize mode will apply, times the image's short side."""
    k0, k1 = height / raw_h, width / raw_w
    k = min(k0, k1) if mode == 2 else max(k0, k1)
    return int(round(k * min(raw_h, raw_w)))

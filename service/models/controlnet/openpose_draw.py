"""The OpenPose stick figure as ControlNet's openpose models were trained on it, drawn in numpy.

The annotator draws each limb as a filled ellipse (its two keypoints the major axis' ends, half
width 4 px) in 60% of the limb's colour, then an 8-connected filled circle of radius 4 at each
keypoint in the keypoint's colour, on black. Those shapes are OpenCV's rasterisations
(``ellipse2Poly`` with 1-degree steps, ``fillConvexPoly``, ``circle``), reproduced here from their
documented rules so the control image lands on the same pixels:

- the ellipse's outline: points ``centre + R(angle) (a cos t, b sin t)`` for t = 0..360 degrees,
  sines from a 7-decimal table as OpenCV's, rounded half to even, repeated points dropped;
- a convex polygon: its outline as 8-connected lines (walked from the left end), then each row
  filled between its two edges, each edge's x stepped in 16.16 fixed point from its upper vertex
  and rounded half up;
- a filled circle: the midpoint circle's spans.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# the 17 limbs drawn (keypoint indices, COCO order as the body model's heatmaps), and the 18 colours
LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip
COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
STICK_WIDTH, RADIUS = 4, 4
_SIN = np.round(np.sin(np.deg2rad(np.arange(451))), 7).astype(np.float32)  # OpenCV's table

Color = tuple[int, int, int]


def ellipse_points(cx: int, cy: int, a: int, b: int, angle: int) -> list[tuple[int, int]]:
    """The outline of a full ellipse with integer semi-axes, rotated by ``angle`` degrees."""
    angle %= 360
    cos, sin = float(_SIN[450 - angle]), float(_SIN[angle])
    pts: list[tuple[int, int]] = []
    for t in range(361):
        x, y = a * float(_SIN[450 - t]), b * float(_SIN[t])
        p = (round(cx + x * cos - y * sin), round(cy + x * sin + y * cos))  # half to even
        if not pts or p != pts[-1]:
            pts.append(p)
    return pts if len(pts) > 1 else [(cx, cy), (cx, cy)]


def _span(canvas: np.ndarray, y: int, x1: int, x2: int, color: Color) -> None:
    h, w = canvas.shape[:2]
    if 0 <= y < h and x2 >= 0 and x1 < w:
        canvas[y, max(x1, 0) : min(x2, w - 1) + 1] = color


def line(canvas: np.ndarray, p0: tuple[int, int], p1: tuple[int, int], color: Color) -> None:
    """An 8-connected line, walked from its left end (Bresenham, OpenCV's tie rule)."""
    if p0[0] > p1[0]:
        p0, p1 = p1, p0
    (x, y), dx, dy = p0, p1[0] - p0[0], abs(p1[1] - p0[1])
    sy = 1 if p1[1] >= p0[1] else -1
    steep = dy > dx
    major, minor = (dy, dx) if steep else (dx, dy)
    err = major - 2 * minor
    h, w = canvas.shape[:2]
    for _ in range(major + 1):
        if 0 <= x < w and 0 <= y < h:
            canvas[y, x] = color
        diagonal = err < 0
        err += -2 * minor + (2 * major if diagonal else 0)
        if steep:
            y += sy
            x += 1 if diagonal else 0
        else:
            x += 1
            y += sy if diagonal else 0


def fill_convex(canvas: np.ndarray, pts: Sequence[tuple[int, int]], color: Color, shift: int = 0) -> None:
    """A filled convex polygon; vertices in pixels with ``shift`` fraction bits (0 or 16)."""
    n = len(pts)
    for i in range(n):
        if shift:
            line_fixed(canvas, pts[i - 1], pts[i], color)
        else:
            line(canvas, pts[i - 1], pts[i], color)
    delta = (1 << shift) >> 1
    ys = [(p[1] + delta) >> shift for p in pts]
    xs = [(p[0] + delta) >> shift for p in pts]
    h, w = canvas.shape[:2]
    if n < 3 or max(xs) < 0 or max(ys) < 0 or min(xs) >= w or min(ys) >= h:
        return
    raw = [p[1] for p in pts]
    top = raw.index(min(raw))
    y, ymax = min(ys), min(max(ys), h - 1)
    # two chains from the top vertex: forwards and backwards; each edge: [x (16.16), dx, end row, vertex]
    edges = [[0, 0, y, top, 1], [0, 0, y, top, -1]]
    budget = n  # edges left to walk: both chains meet at the bottom
    half = 1 << 15
    while True:
        for e in edges:
            if y < e[2]:
                continue
            start, step = e[3], e[4]
            nxt = (start + step) % n
            while budget > 0:
                budget -= 1
                ty = ys[nxt]
                if ty > y:
                    xs0, xe0 = pts[start][0] << (16 - shift), pts[nxt][0] << (16 - shift)
                    # C division (truncates towards zero) of the rounded per-row step
                    num, den = (xe0 - xs0) * 2 + (ty - y), 2 * (ty - y)
                    q = abs(num) // den
                    e[0], e[1], e[2], e[3] = xs0, (q if num >= 0 else -q), ty, nxt
                    break
                start, nxt = nxt, (nxt + step) % n
            else:
                budget = -1
        if budget < 0:
            break
        left, right = sorted((edges[0][0], edges[1][0]))
        _span(canvas, y, (left + half) >> 16, (right + half) >> 16, color)
        edges[0][0] += edges[0][1]
        edges[1][0] += edges[1][1]
        y += 1
        if y > ymax:
            break


def line_fixed(canvas: np.ndarray, p0: tuple[int, int], p1: tuple[int, int], color: Color) -> None:
    """A line between points in 16.16 fixed point: one pixel per step along the major axis, the
    minor coordinate stepped in fixed point (OpenCV's sub-pixel polygon outline)."""
    one, half = 1 << 16, 1 << 15
    (x1, y1), (x2, y2) = p0, p1
    dx, dy = x2 - x1, y2 - y1
    h, w = canvas.shape[:2]

    def put(x: int, y: int) -> None:
        if 0 <= x < w and 0 <= y < h:
            canvas[y, x] = color

    if abs(dx) > abs(dy):
        if dx < 0:
            (x1, y1), (x2, y2), dy = (x2, y2), (x1, y1), -dy
        step = _cdiv(dy * one, abs(dx) | 1)
        count = (x2 - x1) >> 16
        put((x2 + half) >> 16, (y2 + half) >> 16)
        x, y = (x1 + half) >> 16, y1 + half
        for _ in range(count + 1):
            put(x, y >> 16)
            x, y = x + 1, y + step
    else:
        if dy < 0:
            (x1, y1), (x2, y2), dx = (x2, y2), (x1, y1), -dx
        step = _cdiv(dx * one, abs(dy) | 1)
        count = (y2 - y1) >> 16
        put((x2 + half) >> 16, (y2 + half) >> 16)
        x, y = x1 + half, (y1 + half) >> 16
        for _ in range(count + 1):
            put(x >> 16, y)
            x, y = x + step, y + 1


def _cdiv(a: int, b: int) -> int:
    """C's integer division (towards zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def thick_line(canvas: np.ndarray, p0: tuple[int, int], p1: tuple[int, int], color: Color) -> None:
    """A 2 px line with round ends: the quadrilateral 1 px either side of the segment (16.16 fixed
    point), and a radius-1 disc at each end."""
    one = 1 << 16
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = float(x0 - x1), float(y1 - y0)
    r2 = dx * dx + dy * dy
    if r2 > 0:
        k = one / math.sqrt(r2)
        ox, oy = round(dy * k), round(dx * k)
        a, b = (x0 * one, y0 * one), (x1 * one, y1 * one)
        quad = [
            (a[0] + ox, a[1] + oy),
            (a[0] - ox, a[1] - oy),
            (b[0] - ox, b[1] - oy),
            (b[0] + ox, b[1] + oy),
        ]
        fill_convex(canvas, quad, color, shift=16)
    circle(canvas, x0, y0, 1, color)
    circle(canvas, x1, y1, 1, color)


def circle(canvas: np.ndarray, cx: int, cy: int, r: int, color: Color) -> None:
    """A filled circle: the midpoint algorithm's horizontal spans."""
    err, dx, dy, plus, minus = 0, r, 0, 1, 2 * r - 1
    while dx >= dy:
        _span(canvas, cy - dy, cx - dx, cx + dx, color)
        _span(canvas, cy + dy, cx - dx, cx + dx, color)
        _span(canvas, cy - dx, cx - dy, cx + dy, color)
        _span(canvas, cy + dx, cx - dy, cx + dy, color)
        dy += 1
        err += plus
        plus += 2
        if err > 0:
            err -= minus
            dx -= 1
            minus -= 2


def draw_body(canvas: np.ndarray, keypoints: Sequence[tuple[float, float] | None]) -> np.ndarray:
    """One person's limbs and keypoints; ``keypoints``: 18 (x, y) in [0, 1] of the canvas, or None."""
    h, w = canvas.shape[:2]
    for (k1, k2), color in zip(LIMBS, COLORS, strict=False):
        p1, p2 = keypoints[k1], keypoints[k2]
        if p1 is None or p2 is None:
            continue
        x1, x2 = p1[0] * float(w), p2[0] * float(w)
        y1, y2 = p1[1] * float(h), p2[1] * float(h)
        length = ((y1 - y2) ** 2 + (x1 - x2) ** 2) ** 0.5
        angle = math.degrees(math.atan2(y1 - y2, x1 - x2))
        pts = ellipse_points(int((x1 + x2) / 2), int((y1 + y2) / 2), int(length / 2), STICK_WIDTH, int(angle))
        fill_convex(canvas, pts, (int(color[0] * 0.6), int(color[1] * 0.6), int(color[2] * 0.6)))
    for p, color in zip(keypoints, COLORS, strict=False):
        if p is not None:
            circle(canvas, int(p[0] * w), int(p[1] * h), RADIUS, color)
    return canvas


HAND_EDGES = (
    (0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10),
    (10, 11), (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20),
)  # fmt: skip
HAND_POINT = (0, 0, 255)
_EPS = 0.01


def _hue(h: float) -> Color:
    """Full-saturation, full-value colour of hue ``h`` in [0, 1), as 0-255 RGB (rounded)."""
    i = int(h * 6)
    f = h * 6 - i
    v, q, t = 1.0, 1.0 - f, f
    rgb = [(v, t, 0.0), (q, v, 0.0), (0.0, v, t), (0.0, q, v), (t, 0.0, v), (v, 0.0, q)][i % 6]
    r, g, b = (round(c * 255) for c in rgb)
    return (r, g, b)


def draw_hand(canvas: np.ndarray, keypoints: Sequence[tuple[float, float] | None]) -> np.ndarray:
    """One hand: 21 keypoints as fractions (float32 values; negative or 0: missing), its 20 bones
    as 2 px lines in hues around the colour wheel, then blue dots of radius 4."""
    h, w = canvas.shape[:2]

    def px(p: tuple[float, float]) -> tuple[int, int]:
        return int(np.float32(p[0]) * w), int(np.float32(p[1]) * h)  # float32, as the reference

    for i, (e1, e2) in enumerate(HAND_EDGES):
        k1, k2 = keypoints[e1], keypoints[e2]
        if k1 is None or k2 is None:
            continue
        (x1, y1), (x2, y2) = px(k1), px(k2)
        if x1 > _EPS and y1 > _EPS and x2 > _EPS and y2 > _EPS:
            thick_line(canvas, (x1, y1), (x2, y2), _hue(i / float(len(HAND_EDGES))))
    for k in keypoints:
        if k is not None:
            x, y = px(k)
            if x > _EPS and y > _EPS:
                circle(canvas, x, y, RADIUS, HAND_POINT)
    return canvas


def draw_face(canvas: np.ndarray, keypoints: Sequence[tuple[float, float]]) -> np.ndarray:
    """Face landmarks (float32 fractions; negative or 0: missing) as white dots of radius 3."""
    h, w = canvas.shape[:2]
    for k in keypoints:
        x, y = int(np.float32(k[0]) * w), int(np.float32(k[1]) * h)
        if x > _EPS and y > _EPS:
            circle(canvas, x, y, 3, (255, 255, 255))
    return canvas

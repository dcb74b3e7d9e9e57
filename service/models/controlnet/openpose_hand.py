"""OpenPose hand keypoints (Simon et al. 2017) as the ControlNet v1.1 annotator finds them.

1. Boxes: from each person's shoulder, elbow and wrist (OpenPose's hand detector rule): the box
   centre is the wrist pushed on by a third of the forearm, its side 1.5 x the longer of the
   forearm and 0.9 x the upper arm, clipped to the image; boxes under 20 px are dropped.
2. Maps: the crop is blurred (Gaussian, sigma 0.8), resized to squares of 184, 368, 552 and 736,
   run through the hand network; each output goes up x8 (Lanczos-4), then to 128 x 128 (area), and
   the four are averaged.
3. Peaks: per keypoint the map is smoothed (sigma 3); of the regions above 0.05 (8-connected) the
   one with the largest sum of the map keeps its values; the keypoint is that region's maximum,
   scaled back to the crop (truncated), or none when no region.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .cv_resize import LANCZOS4, method_for, resize_maps_twice, resize_u8
from .openpose_body import Body, gaussian
from .openpose_net import HandPoseNet

SIZES = (184, 368, 552, 736)  # 368 x (0.5, 1, 1.5, 2)
MAP_SIZE, STRIDE, THRESHOLD, PARTS = 128, 8, 0.05, 21
MIN_BOX = 20
# (shoulder, elbow, wrist) body keypoints and whether it is the left hand
ARMS = ((5, 6, 7, True), (2, 3, 4, False))


def boxes(body: Body, height: int, width: int) -> list[tuple[int, int, int, bool]]:
    """Square hand boxes (x, y, side, is_left) from a person's arms, left hand first."""
    out = []
    for s, e, w, left in ARMS:
        kps = body.keypoints[s], body.keypoints[e], body.keypoints[w]
        if any(k is None for k in kps):
            continue
        (x1, y1), (x2, y2), (x3, y3) = ((k.x, k.y) for k in kps if k is not None)
        x = x3 + 0.33 * (x3 - x2)
        y = y3 + 0.33 * (y3 - y2)
        side = 1.5 * max(
            math.sqrt((x3 - x2) ** 2 + (y3 - y2) ** 2), 0.9 * math.sqrt((x2 - x1) ** 2 + (y2 - y1) ** 2)
        )
        x, y = max(x - side / 2, 0), max(y - side / 2, 0)
        side = min(width - x if x + side > width else side, height - y if y + side > height else side)
        if side >= MIN_BOX:
            out.append((int(x), int(y), int(side), left))
    return out


def blur(img: np.ndarray, sigma: float = 0.8) -> np.ndarray:
    """Gaussian blur of an 8-bit image: 7 taps for sigma 0.8 (OpenCV's size for 8-bit images,
    2 * round(3 sigma) + 1), the border mirrored without repeating the edge (``c b | a b c``)."""
    n = int(round(sigma * 3 * 2 + 1)) | 1
    x = np.arange(n) - (n - 1) / 2
    k = np.exp(-(x * x) / (2 * sigma * sigma))
    k /= k.sum()
    r = n // 2
    out = img.astype(np.float64)
    for axis in (0, 1):
        if out.shape[axis] == 1:
            continue
        pad = [(0, 0)] * out.ndim
        pad[axis] = (r, r)
        p = np.moveaxis(np.pad(out, pad, mode="reflect"), axis, 0)
        size = out.shape[axis]
        acc = sum(p[i : i + size] * k[i] for i in range(n))
        out = np.moveaxis(acc, 0, axis)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _largest_region(mask: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The 8-connected region of ``mask`` with the largest sum of ``values`` (first in raster
    order of its first pixel on a tie)."""
    left = mask.copy()
    best, best_sum = np.zeros_like(mask), -np.inf
    while left.any():
        seed = np.unravel_index(np.argmax(left), left.shape)
        region = np.zeros_like(mask)
        region[seed] = True
        while True:
            p = np.pad(region, 1)
            grown = np.zeros_like(region)
            for dy in (0, 1, 2):
                for dx in (0, 1, 2):
                    grown |= p[dy : dy + region.shape[0], dx : dx + region.shape[1]]
            grown &= mask
            if (grown == region).all():
                break
            region = grown
        total = float(values[region].sum())
        if total > best_sum:
            best, best_sum = region, total
        left &= ~region
    return best


def hand_maps(net: HandPoseNet, crop: np.ndarray) -> np.ndarray:
    """The averaged heatmaps [128, 128, 22] (float64) of a BGR crop."""
    soft = blur(crop)
    h, w = soft.shape[:2]
    avg = np.zeros((MAP_SIZE, MAP_SIZE, 22))
    for size in SIZES:
        scaled = resize_u8(soft, size, size, method_for(h, w, size, size))
        x = torch.from_numpy(scaled.astype(np.float32) / 256 - 0.5).permute(2, 0, 1)[None].contiguous()
        with torch.inference_mode():
            out = net(x.to(next(net.parameters()).device))[0].permute(1, 2, 0).float().cpu().numpy()
        up = (out.shape[0] * STRIDE, out.shape[1] * STRIDE, LANCZOS4)  # x8, then to 128 x 128
        small = resize_maps_twice(out, up, (MAP_SIZE, MAP_SIZE, method_for(size, size, MAP_SIZE, MAP_SIZE)))
        avg += small.astype(np.float32) / len(SIZES)
    return avg


def hand_peaks(maps: np.ndarray, height: int, width: int) -> list[tuple[int, int] | None]:
    """Each keypoint's (x, y) in the crop, or None."""
    out: list[tuple[int, int] | None] = []
    for part in range(PARTS):
        raw = maps[:, :, part]
        above = gaussian(raw) > THRESHOLD
        if not above.any():
            out.append(None)
            continue
        kept = np.where(_largest_region(above, raw), raw, 0.0)
        y, x = np.unravel_index(np.argmax(kept), kept.shape)
        out.append((int(float(x) * float(width) / MAP_SIZE), int(float(y) * float(height) / MAP_SIZE)))
    return out


def detect(net: HandPoseNet, bgr: np.ndarray, body: Body) -> list[list[tuple[float, float] | None]]:
    """A person's hands: 21 keypoints each as fractions of the image (None: not found, or at the
    crop's top / left edge as the reference reads 0 as missing)."""
    h, w = bgr.shape[:2]
    hands = []
    for x0, y0, side, _ in boxes(body, h, w):
        peaks = hand_peaks(hand_maps(net, bgr[y0 : y0 + side, x0 : x0 + side]), side, side)
        hand: list[tuple[float, float] | None] = []
        for p in peaks:
            px, py = p if p is not None else (0, 0)
            # float32 as the reference holds them; a 0 coordinate is its "missing"
            fx = np.float32(-1.0 if px < 1e-6 else px + x0) / np.float32(w)
            fy = np.float32(-1.0 if py < 1e-6 else py + y0) / np.float32(h)
            hand.append((float(fx), float(fy)))
        hands.append(hand)
    return hands

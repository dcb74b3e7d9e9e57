"""OpenPose face landmarks as the ControlNet v1.1 annotator finds them (its "openpose_face").

1. Box (lllyasviel's rule): around the nose, half-side the largest of 3 x each eye's and 1.5 x
   each ear's Chebyshev distance from it; the top-left clipped at 0 and the side cut where the
   box's *half* side would pass the image edge (the annotator's test, kept as it is); boxes under
   20 px are dropped.
2. Maps: the crop resized to 384 x 384 (area / Lanczos-4), the face network's last stage,
   bilinearly resized (corners aligned) back to the crop's size.
3. Landmarks: every channel, the background's too as the annotator reads all 71, whose map
   exceeds 0.05 somewhere gives its maximum (first in raster order); channels that never do are
   left out, so later landmarks move up the list as there.
"""

from __future__ import annotations

import numpy as np
import torch

from .cv_resize import method_for, resize_u8
from .openpose_body import Body
from .openpose_net import FacePoseNet

INPUT, THRESHOLD, MIN_BOX = 384, 0.05, 20
NOSE, EYES, EARS = 0, (14, 15), (16, 17)


def box(body: Body, height: int, width: int) -> tuple[int, int, int] | None:
    """The face crop (x, y, side), or None."""
    kp = body.keypoints
    head = kp[NOSE]
    if head is None or all(kp[i] is None for i in (*EYES, *EARS)):
        return None
    half = 0.0
    for idxs, factor in ((EYES, 3.0), (EARS, 1.5)):
        for i in idxs:
            k = kp[i]
            if k is not None:
                half = max(half, max(abs(head.x - k.x), abs(head.y - k.y)) * factor)
    x, y = max(head.x - half, 0), max(head.y - half, 0)
    side_x = width - x if x + half > width else half * 2
    side_y = height - y if y + half > height else half * 2
    side = min(side_x, side_y)
    return (int(x), int(y), int(side)) if side >= MIN_BOX else None


def face_maps(net: FacePoseNet, crop: np.ndarray) -> np.ndarray:
    """The last stage's 71 maps at the crop's size [71, h, w] (float32)."""
    h, w = crop.shape[:2]
    scaled = resize_u8(crop, INPUT, INPUT, method_for(h, w, INPUT, INPUT))
    x = torch.from_numpy(scaled).permute(2, 0, 1) / 256.0 - 0.5
    with torch.inference_mode():
        out = net(x[None].to(next(net.parameters()).device))
        maps = torch.nn.functional.interpolate(out, (h, w), mode="bilinear", align_corners=True)
    return maps[0].float().cpu().numpy()


def landmarks(maps: np.ndarray) -> list[tuple[int, int]]:
    """(x, y) in the crop of each channel that passes the threshold."""
    out = []
    for m in maps:
        if not (m > THRESHOLD).any():
            continue
        y, x = np.unravel_index(np.argmax(np.where(m > THRESHOLD, m, -np.inf)), m.shape)
        out.append((int(x), int(y)))
    return out


def detect(net: FacePoseNet, bgr: np.ndarray, body: Body) -> list[tuple[float, float]] | None:
    """A person's face landmarks as float32 fractions of the image (0 in the crop: -1, missing)."""
    found = box(body, *bgr.shape[:2])
    if found is None:
        return None
    x0, y0, side = found
    h, w = bgr.shape[:2]
    points = landmarks(face_maps(net, bgr[y0 : y0 + side, x0 : x0 + side]))
    if not points:
        return None
    return [
        (
            float(np.float32(-1.0 if px < 1e-6 else px + x0) / np.float32(w)),
            float(np.float32(-1.0 if py < 1e-6 else py + y0) / np.float32(h)),
        )
        for px, py in points
    ]

"""OpenPose body keypoints (Cao et al. 2017) as the ControlNet v1.1 annotator computes them.

1. Maps: the BGR image is scaled so its height is 368 x 0.5 = 184 (the annotator's single scale),
   padded right and down to a multiple of 8 with grey 128, and run through the network; its PAFs
   and heatmaps (1/8 size) go back up x8, lose the padding and are resized to the image's size
   (OpenCV's area / Lanczos-4 rules, ``cv_resize``).
2. Peaks: each of the 18 keypoint heatmaps is smoothed by a Gaussian (sigma 3, radius 12,
   reflected border); a peak is a pixel >= its four neighbours (0 beyond the border) and > 0.1.
3. Limbs: for each of the 19 limbs, every (A, B) pair of its two keypoints' peaks is scored by the
   limb's PAF sampled at 10 evenly spaced points from A to B (rounded half to even), dotted with
   the unit vector A -> B: a pair counts when more than 80% of the samples exceed 0.05 and their
   mean, plus ``min(0.5 * H / |AB| - 1, 0)`` (a penalty for limbs longer than half the image),
   is positive. Pairs are taken greedily by that score, each peak in one pair at most.
4. People: limbs are joined into people through shared peaks, in limb order; two partial people
   sharing no keypoint merge; people with fewer than 4 keypoints or a mean score under 0.4 drop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .cv_resize import LANCZOS4, method_for, resize_maps_twice, resize_u8
from .openpose_net import BodyPoseNet

BOX, SCALE, STRIDE, PAD_VALUE = 368, 0.5, 8, 128
PEAK_THRESHOLD, PAF_THRESHOLD, SAMPLES = 0.1, 0.05, 10
KEYPOINTS = 18
# the limbs (keypoint pairs, COCO order) and the PAF channels (x, y) that score each
LIMB_PAIRS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11),
    (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17),
)  # fmt: skip
LIMB_PAFS = (
    (12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5), (6, 7),
    (8, 9), (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27),
)  # fmt: skip
NEW_PERSON_LIMBS = 17  # the last two limbs (ear - shoulder) only join, never start a person


@dataclass(frozen=True)
class Keypoint:
    x: float  # pixels of the image the body was found in
    y: float
    score: float
    id: int


@dataclass(frozen=True)
class Body:
    keypoints: list[Keypoint | None]  # 18, COCO order
    score: float
    parts: int


def body_maps(net: BodyPoseNet, bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps [H, W, 19] and PAFs [H, W, 38] (float64) at the image's size."""
    h, w = bgr.shape[:2]
    k = SCALE * BOX / h
    th, tw = h * k, w * k  # as the annotator computes them (then truncated)
    scaled = resize_u8(bgr, int(th), int(tw), method_for(h, w, th, tw))
    sh, sw = scaled.shape[:2]
    ph, pw = -sh % STRIDE, -sw % STRIDE
    padded = np.pad(scaled, ((0, ph), (0, pw), (0, 0)), constant_values=PAD_VALUE)
    x = torch.from_numpy(padded.astype(np.float32) / 256 - 0.5).permute(2, 0, 1)[None].contiguous()
    with torch.inference_mode():
        paf, heat = net(x.to(next(net.parameters()).device))
    out = []
    for m in (heat, paf):
        small = m[0].permute(1, 2, 0).float().cpu().numpy()
        up = (small.shape[0] * STRIDE, small.shape[1] * STRIDE, LANCZOS4)  # x8, less the padding
        full = resize_maps_twice(small, up, (h, w, method_for(sh, sw, h, w)), crop=(sh, sw))
        out.append(full.astype(np.float32).astype(np.float64))  # OpenCV resizes float32 maps
    return out[0], out[1]


def gaussian(img: np.ndarray, sigma: float = 3.0) -> np.ndarray:
    """A separable Gaussian (radius 4 sigma) with a mirrored border (``d c b a | a b c d``)."""
    r = int(4 * sigma + 0.5)
    x = np.arange(-r, r + 1)
    k = np.exp(-0.5 / (sigma * sigma) * x**2)
    k = k / k.sum()
    out = img.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        p = np.moveaxis(np.pad(out, pad, mode="symmetric"), axis, 0)
        n = out.shape[axis]
        # the symmetric kernel's pairs summed first, centre outwards (scipy's order)
        acc = p[r : r + n] * k[r]
        for j in range(1, r + 1):
            acc = acc + (p[r + j : r + j + n] + p[r - j : r - j + n]) * k[r + j]
        out = np.moveaxis(acc, 0, axis)
    return out


def find_peaks(heat: np.ndarray) -> list[np.ndarray]:
    """Per keypoint, its peaks as rows (x, y, score, id); ids count up over all keypoints."""
    peaks, next_id = [], 0
    for part in range(KEYPOINTS):
        raw = heat[:, :, part]
        s = gaussian(raw)
        p = np.pad(s, 1)  # zeros beyond the border
        core = p[1:-1, 1:-1]
        top = (core >= p[:-2, 1:-1]) & (core >= p[2:, 1:-1]) & (core >= p[1:-1, :-2]) & (core >= p[1:-1, 2:])
        ys, xs = np.nonzero(top & (s > PEAK_THRESHOLD))  # row-major: y, then x
        ids = np.arange(next_id, next_id + len(xs))
        next_id += len(xs)
        peaks.append(np.stack([xs, ys, raw[ys, xs], ids], axis=1).astype(np.float64).reshape(-1, 4))
    return peaks


def _linspace(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """numpy's linspace per row, element for element (its arithmetic: start + i * step, last = stop)."""
    delta = b - a
    i = np.arange(n, dtype=np.float64)[None, :]
    out = np.where(delta[:, None] == 0, a[:, None], i * (delta / (n - 1))[:, None] + a[:, None])
    out[:, -1] = b
    return out


def score_limb(a: np.ndarray, b: np.ndarray, paf_x: np.ndarray, paf_y: np.ndarray, height: int) -> np.ndarray:
    """The connections of one limb: rows (id A, id B, score, index in A, index in B)."""
    # every pair in (i, j) order, as the greedy pass reads ties
    ia, ib = np.repeat(np.arange(len(a)), len(b)), np.tile(np.arange(len(b)), len(a))
    vx, vy = b[ib, 0] - a[ia, 0], b[ib, 1] - a[ia, 1]
    norm = np.maximum(np.sqrt(vx * vx + vy * vy), 0.001)
    ux, uy = vx / norm, vy / norm
    px = np.rint(_linspace(a[ia, 0], b[ib, 0], SAMPLES)).astype(np.int64)
    py = np.rint(_linspace(a[ia, 1], b[ib, 1], SAMPLES)).astype(np.int64)
    dots = paf_x[py, px] * ux[:, None] + paf_y[py, px] * uy[:, None]
    total = np.zeros(len(ia))
    for s in range(SAMPLES):  # summed in order, as the reference's Python sum
        total = total + dots[:, s]
    score = total / SAMPLES + np.minimum(0.5 * height / norm - 1, 0)
    ok = ((dots > PAF_THRESHOLD).sum(axis=1) > 0.8 * SAMPLES) & (score > 0)
    order = [k for k in np.argsort(-score, kind="stable") if ok[k]]
    used_a: set[int] = set()
    used_b: set[int] = set()
    rows = []
    for k in order:
        i, j = int(ia[k]), int(ib[k])
        if i in used_a or j in used_b:
            continue
        used_a.add(i)
        used_b.add(j)
        rows.append((a[i, 3], b[j, 3], score[k], i, j))
        if len(rows) >= min(len(a), len(b)):
            break
    return np.array(rows, np.float64).reshape(-1, 5)


def assemble(peaks: list[np.ndarray], paf: np.ndarray, height: int) -> tuple[np.ndarray, np.ndarray]:
    """People from the peaks: ``people`` rows of 20 (18 peak ids or -1, total score, keypoint
    count) and ``candidates`` rows (x, y, score, id)."""
    cand = np.concatenate(peaks, axis=0) if peaks else np.zeros((0, 4))
    people = np.zeros((0, 20))
    for k, ((pa, pb), (cx, cy)) in enumerate(zip(LIMB_PAIRS, LIMB_PAFS, strict=True)):
        if not len(peaks[pa]) or not len(peaks[pb]):
            continue
        for id_a, id_b, s, _, _ in score_limb(peaks[pa], peaks[pb], paf[:, :, cx], paf[:, :, cy], height):
            hits = [r for r in range(len(people)) if people[r, pa] == id_a or people[r, pb] == id_b]
            # (the reference keeps two matches in a 2-slot list: a third would raise there; two are read)
            if len(hits) == 1:
                r = hits[0]
                if people[r, pb] != id_b:
                    _add(people[r], pb, id_b, cand[int(id_b), 2] + s)
            elif len(hits) >= 2 and _overlap(people[hits[0]], people[hits[1]]):
                _add(people[hits[0]], pb, id_b, cand[int(id_b), 2] + s)  # unconditionally, as the reference
            elif len(hits) >= 2:  # two partial people with no keypoint in common: one person
                r1, r2 = hits[0], hits[1]
                people[r1, :-2] += people[r2, :-2] + 1  # -1 + (id + 1) = id where r1 lacked it
                people[r1, -2:] += people[r2, -2:]
                people[r1, -2] += s
                people = np.delete(people, r2, axis=0)
            elif k < NEW_PERSON_LIMBS:
                row = -np.ones(20)
                row[pa], row[pb] = id_a, id_b
                row[-1] = 2
                row[-2] = cand[int(id_a), 2] + cand[int(id_b), 2] + s
                people = np.vstack([people, row])
    keep = (people[:, -1] >= 4) & (people[:, -2] / people[:, -1] >= 0.4)  # count >= 2 always
    return cand, people[keep]


def _add(person: np.ndarray, part: int, peak: float, score: float) -> None:
    person[part] = peak
    person[-1] += 1
    person[-2] += score


def _overlap(p1: np.ndarray, p2: np.ndarray) -> bool:
    return bool((((p1 >= 0).astype(int) + (p2 >= 0).astype(int))[:-2] == 2).any())


def bodies(cand: np.ndarray, people: np.ndarray) -> list[Body]:
    out = []
    for person in people:
        kps: list[Keypoint | None] = []
        for idx in person[:KEYPOINTS].astype(int):
            c = cand[idx] if idx != -1 else None
            kps.append(None if c is None else Keypoint(float(c[0]), float(c[1]), float(c[2]), int(c[3])))
        out.append(Body(kps, float(person[18]), int(person[19])))
    return out


def detect(net: BodyPoseNet, rgb: np.ndarray) -> list[Body]:
    """The people in an RGB uint8 image, keypoints in its pixels."""
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    heat, paf = body_maps(net, bgr)
    peaks = find_peaks(heat)
    cand, people = assemble(peaks, paf, bgr.shape[0])
    return bodies(cand, people)


def normalised(body: Body, height: int, width: int) -> list[tuple[float, float] | None]:
    """Keypoints as fractions of the image (the drawing reads them back against its canvas)."""
    return [None if k is None else (k.x / float(width), k.y / float(height)) for k in body.keypoints]

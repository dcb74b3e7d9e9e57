"""The OpenPose preprocessors, named as the A1111 extension names them; each is listed (and
accepted) only while its weight files are in ``model_store/annotators/``.

- ``openpose``: body keypoints (``body_pose_model.pth``) drawn as the stick figure;
- ``openpose_hand``: and each person's hands (``hand_pose_model.pth`` too).

The extension's ``openpose_face``, ``openpose_faceonly`` and ``openpose_full`` also need
``facenet.pth`` and are not provided yet: never listed, so a unit naming one is the 422 listing
what is available.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import cv_resize, openpose_body, openpose_draw, openpose_hand
from .openpose_net import load_body, load_hand

BODY_FILE, HAND_FILE = "body_pose_model.pth", "hand_pose_model.pth"
MODULES = ("openpose", "openpose_hand")
_NEEDS = {"openpose": (BODY_FILE,), "openpose_hand": (BODY_FILE, HAND_FILE)}
PAD_TO = 64
# where a body model may be: lllyasviel/Annotators' flat layout, or the extension's openpose folder
_PLACES = ("", "openpose")

_lock = threading.Lock()
_nets: dict[tuple[Path, float], Any] = {}


def weight_file(folder: Path, name: str = BODY_FILE) -> Path | None:
    """A pose model in ``model_store/annotators/`` (``folder``), or None."""
    for place in _PLACES:
        path = Path(folder) / place / name
        if path.is_file():
            return path
    return None


def available(folder: Path) -> list[str]:
    return [m for m in MODULES if all(weight_file(folder, f) is not None for f in _NEEDS[m])]


def _net(path: Path, load: Callable[[Path], Any]) -> Any:
    key = (path.resolve(), path.stat().st_mtime)  # a replaced file loads anew
    with _lock:
        net = _nets.get(key)
        if net is None:
            net = _nets[key] = load(path)
        return net


def scale(img: np.ndarray, resolution: int | None) -> np.ndarray:
    """The A1111 extension's scaling before a detector: the short side to ``resolution`` (OpenCV's
    area rule when shrinking, bicubic when growing; sides rounded half to even)."""
    if not resolution:
        return img
    h, w = img.shape[:2]
    k = float(resolution) / float(min(h, w))
    th, tw = max(1, round(h * k)), max(1, round(w * k))
    return cv_resize.resize_u8(img, th, tw, cv_resize.CUBIC if k > 1 else cv_resize.AREA)


def run(folder: Path, name: str, img: np.ndarray, resolution: int | None = None) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> the pose image (figures on black) at the size the image is scaled to
    (``resolution``: its short side; None: as it is). As the A1111 extension, the detector sees
    the scaled image padded right and down to multiples of 64 (edge pixels repeated); the figure
    drawn on that canvas is cropped back."""
    paths = [weight_file(folder, f) for f in _NEEDS.get(name, ("?",))]
    if name not in MODULES or any(p is None for p in paths):
        raise KeyError(name)
    body_net = _net(paths[0], load_body)  # type: ignore[arg-type]
    hand_net = _net(paths[1], load_hand) if name == "openpose_hand" else None  # type: ignore[arg-type]
    img = scale(img, resolution)
    h, w = img.shape[:2]
    padded = np.pad(img, ((0, -h % PAD_TO), (0, -w % PAD_TO), (0, 0)), mode="edge")
    ph, pw = padded.shape[:2]
    canvas = np.zeros((ph, pw, 3), np.uint8)
    bgr = np.ascontiguousarray(padded[:, :, ::-1])
    for body in openpose_body.detect(body_net, padded):
        openpose_draw.draw_body(canvas, openpose_body.normalised(body, ph, pw))
        for hand in openpose_hand.detect(hand_net, bgr, body) if hand_net is not None else []:
            openpose_draw.draw_hand(canvas, hand)
    return np.ascontiguousarray(canvas[:h, :w])

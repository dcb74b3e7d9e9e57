"""The OpenPose preprocessors, named as the A1111 extension names them; each is listed (and
accepted) only while its weight files are in ``model_store/annotators/``.

- ``openpose``: body keypoints (``body_pose_model.pth``) drawn as the stick figure.

The extension's ``openpose_hand``, ``openpose_face``, ``openpose_faceonly`` and ``openpose_full``
also need ``hand_pose_model.pth`` / ``facenet.pth`` and are not provided yet: they are never
listed, so a unit naming one is the 422 listing what is available.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from . import cv_resize, openpose_body, openpose_draw
from .openpose_net import BodyPoseNet, load_body

BODY_FILE = "body_pose_model.pth"
MODULES = ("openpose",)
PAD_TO = 64
# where a body model may be: lllyasviel/Annotators' flat layout, or the extension's openpose folder
_PLACES = ("", "openpose")

_lock = threading.Lock()
_nets: dict[tuple[Path, float], BodyPoseNet] = {}


def body_file(folder: Path) -> Path | None:
    """The body model in ``model_store/annotators/`` (``folder``), or None."""
    for place in _PLACES:
        path = Path(folder) / place / BODY_FILE
        if path.is_file():
            return path
    return None


def available(folder: Path) -> list[str]:
    return list(MODULES) if body_file(folder) is not None else []


def _body_net(path: Path) -> BodyPoseNet:
    key = (path.resolve(), path.stat().st_mtime)  # a replaced file loads anew
    with _lock:
        net = _nets.get(key)
        if net is None:
            net = _nets[key] = load_body(path)
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
    if name not in MODULES:
        raise KeyError(name)
    path = body_file(folder)
    if path is None:
        raise KeyError(name)
    img = scale(img, resolution)
    h, w = img.shape[:2]
    padded = np.pad(img, ((0, -h % PAD_TO), (0, -w % PAD_TO), (0, 0)), mode="edge")
    ph, pw = padded.shape[:2]
    canvas = np.zeros((ph, pw, 3), np.uint8)
    for body in openpose_body.detect(_body_net(path), padded):
        openpose_draw.draw_body(canvas, openpose_body.normalised(body, ph, pw))
    return np.ascontiguousarray(canvas[:h, :w])

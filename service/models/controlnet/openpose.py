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

from . import openpose_body, openpose_draw
from .openpose_net import BodyPoseNet, load_body

BODY_FILE = "body_pose_model.pth"
MODULES = ("openpose",)
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


def run(folder: Path, name: str, img: np.ndarray) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> the pose image, RGB uint8 [H, W, 3] (figures on black)."""
    if name not in MODULES:
        raise KeyError(name)
    path = body_file(folder)
    if path is None:
        raise KeyError(name)
    h, w = img.shape[:2]
    canvas = np.zeros((h, w, 3), np.uint8)
    for body in openpose_body.detect(_body_net(path), img):
        openpose_draw.draw_body(canvas, openpose_body.normalised(body, h, w))
    return canvas

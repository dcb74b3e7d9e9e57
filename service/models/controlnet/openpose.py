"""The OpenPose preprocessors, named as the A1111 extension names them; each is listed (and
accepted) only while its weight files are in ``model_store/annotators/``.

- ``openpose``: body keypoints (``body_pose_model.pth``) drawn as the stick figure;
- ``openpose_hand``: and each person's hands (``hand_pose_model.pth`` too);
- ``openpose_face``: the body and each face's landmarks (``facenet.pth`` too);
- ``openpose_faceonly``: the face landmarks alone (the body still finds the faces);
- ``openpose_full``: body, hands and faces (all three files).

The networks run on the device given (the service's model device: CUDA when the service runs
there) in float32; only their output maps come back to the CPU, where the peak finding and the
drawing work. No device, or the CPU: the networks stay as loaded, on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.models.file_names import is_file

from . import cv_resize, openpose_body, openpose_draw, openpose_face, openpose_hand
from .annotator_cache import NETWORKS, Device
from .openpose_net import load_body, load_face, load_hand

BODY_FILE, HAND_FILE, FACE_FILE = "body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"
# module -> (draw the body, hands, face)
DRAWS = {
    "openpose": (True, False, False),
    "openpose_face": (True, False, True),
    "openpose_faceonly": (False, False, True),
    "openpose_full": (True, True, True),
    "openpose_hand": (True, True, False),
}
MODULES = tuple(DRAWS)
_NEEDS = {
    m: (BODY_FILE, *([HAND_FILE] if hand else []), *([FACE_FILE] if face else []))
    for m, (_, hand, face) in DRAWS.items()
}
PAD_TO = 64
# where a body model may be: lllyasviel/Annotators' flat layout, or the extension's openpose folder
_PLACES = ("", "openpose")


def weight_file(folder: Path, name: str = BODY_FILE) -> Path | None:
    """A pose model in ``model_store/annotators/`` (``folder``), or None."""
    for place in _PLACES:
        path = Path(folder) / place / name
        if is_file(path):
            return path
    return None


def available(folder: Path) -> list[str]:
    return [m for m in MODULES if all(weight_file(folder, f) is not None for f in _NEEDS[m])]


def _net(path: Path, load: Callable[[Path], torch.nn.Module], device: Device = None) -> Any:
    """The network in ``path`` on ``device`` (None: the CPU), loaded once per file version."""
    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cpu":  # as loaded: the CPU path is the one the reference tests pin
        return NETWORKS.get([path], lambda: load(path), "cpu")
    dev = torch.empty(0, device=dev).device  # "cuda" and "cuda:0" name one copy (the index filled in)
    return NETWORKS.get([path], lambda: load(path).to(dev, torch.float32), str(dev))


def scale(img: np.ndarray, resolution: int | None) -> np.ndarray:
    """The A1111 extension's scaling before a detector: the short side to ``resolution`` (OpenCV's
    area rule when shrinking, bicubic when growing; sides rounded half to even)."""
    if not resolution:
        return img
    h, w = img.shape[:2]
    k = float(resolution) / float(min(h, w))
    th, tw = max(1, round(h * k)), max(1, round(w * k))
    return cv_resize.resize_u8(img, th, tw, cv_resize.CUBIC if k > 1 else cv_resize.AREA)


def run(
    folder: Path, name: str, img: np.ndarray, resolution: int | None = None, device: Device = None
) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> the pose image (figures on black) at the size the image is scaled to
    (``resolution``: its short side; None: as it is). As the A1111 extension, the detector sees
    the scaled image padded right and down to multiples of 64 (edge pixels repeated); the figure
    drawn on that canvas is cropped back. The networks run on ``device`` (None: the CPU)."""
    if name not in MODULES:
        raise KeyError(name)
    files = {f: weight_file(folder, f) for f in _NEEDS[name]}
    if any(p is None for p in files.values()):
        raise KeyError(name)
    draw_body, draw_hands, draw_face = DRAWS[name]
    loaders = {BODY_FILE: load_body, HAND_FILE: load_hand, FACE_FILE: load_face}
    nets = {f: _net(p, loaders[f], device) for f, p in files.items() if p is not None}
    img = scale(img, resolution)
    h, w = img.shape[:2]
    padded = np.pad(img, ((0, -h % PAD_TO), (0, -w % PAD_TO), (0, 0)), mode="edge")
    ph, pw = padded.shape[:2]
    canvas = np.zeros((ph, pw, 3), np.uint8)
    bgr = np.ascontiguousarray(padded[:, :, ::-1])
    for body in openpose_body.detect(nets[BODY_FILE], padded):
        if draw_body:
            openpose_draw.draw_body(canvas, openpose_body.normalised(body, ph, pw))
        for hand in openpose_hand.detect(nets[HAND_FILE], bgr, body) if draw_hands else []:
            openpose_draw.draw_hand(canvas, hand)
        face = openpose_face.detect(nets[FACE_FILE], bgr, body) if draw_face else None
        if face is not None:
            openpose_draw.draw_face(canvas, face)
    return np.ascontiguousarray(canvas[:h, :w])

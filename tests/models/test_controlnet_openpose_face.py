"""``openpose_face`` / ``openpose_faceonly`` / ``openpose_full`` against controlnet_aux 0.0.10's
face estimator (lllyasviel's OpenPose face model as the A1111 extension runs it).

- The face network loads ``facenet.pth`` by its published names and computes what the
  reference's ``FaceNet`` does (test_controlnet_openpose_hand.py, with the hand network's).
- With the networks replaced (in ours and in the reference) by fixed maps of two drawn people, a
  drawn hand and a drawn face: the face boxes and the 71 landmarks of each face are the
  reference's, ``openpose_faceonly`` draws the reference's image pixel for pixel and
  ``openpose_full`` (body, hands, faces) within the hand lines' tolerance (``openpose_face`` is
  the body's figure, equal in test_controlnet_openpose.py, with these faces)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("skimage", reason="the test oracles (make setup) are not installed")

from service.models.controlnet import openpose, openpose_draw  # noqa: E402
from tests.models.test_controlnet_openpose import DrawnPeople, figure  # noqa: E402
from tests.models.test_controlnet_openpose_hand import DrawnHand, DrawnMaps  # noqa: E402
from tests.support.openpose_files import reference  # noqa: E402

# 70 landmarks as fractions of the crop (a 7 x 10 grid)
FACE = [(0.15 + 0.1 * (i % 10) * 0.8, 0.2 + 0.1 * (i // 10)) for i in range(70)]


class _Stages(torch.nn.Module):
    """The reference's FaceNet returns the list of every stage's maps."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.net(x)]


def test_faces_found_and_drawn_as_controlnet_aux(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    op = reference()
    body, hand, face = DrawnPeople(), DrawnHand(), DrawnMaps(FACE, 0.02)
    b, h, f = object.__new__(op.Body), object.__new__(op.Hand), object.__new__(op.Face)
    b.model, h.model = body, hand
    f.model = _Stages(face)  # the reference reads the last of the stages' maps
    img = figure(256, 512)
    poses = op.OpenposeDetector(b, h, f).detect_poses(img, include_hand=True, include_face=True)
    assert len(poses) == 2 and all(p.face is not None and len(p.face) == 71 for p in poses)
    folder = tmp_path / "annotators"
    folder.mkdir()
    for name in (openpose.BODY_FILE, openpose.HAND_FILE, openpose.FACE_FILE):
        (folder / name).write_bytes(b"")
    assert openpose.available(folder) == list(openpose.MODULES)
    nets = {openpose.BODY_FILE: body, openpose.HAND_FILE: hand, openpose.FACE_FILE: face}
    monkeypatch.setattr(openpose, "_net", lambda path, load, device=None: nets[path.name])
    faces: list[Any] = []
    draw = openpose_draw.draw_face
    monkeypatch.setattr(
        openpose_draw, "draw_face", lambda canvas, kps: (faces.append(kps), draw(canvas, kps))[1]
    )
    only = openpose.run(folder, "openpose_faceonly", img)
    ref = [[(k.x, k.y) for k in p.face] for p in poses]
    assert np.array_equal(np.array(faces, np.float32), np.array(ref, np.float32))  # 2 x 71 landmarks
    want = op.draw_poses(poses, *img.shape[:2], draw_body=False, draw_hand=False, draw_face=True)
    assert (want > 0).any(axis=2).sum() > 1000 and np.array_equal(only, want)
    full = openpose.run(folder, "openpose_full", img)
    want = op.draw_poses(poses, *img.shape[:2], draw_body=True, draw_hand=True, draw_face=True)
    drawn, differ = (want > 0).any(axis=2), (full != want).any(axis=2)
    assert differ.sum() <= 0.005 * drawn.sum(), (differ.sum(), drawn.sum())

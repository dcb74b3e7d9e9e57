"""``openpose_hand`` against controlnet_aux 0.0.10 (body + hand estimators, as the A1111 extension's
``openpose_hand`` runs them).

- The hand and face networks load ``hand_pose_model.pth`` / ``facenet.pth`` by their published
  names (random weights written with the reference's own key names) and compute what the
  reference's ``handpose_model`` / ``FaceNet`` do.
- With both networks replaced (in ours and in the reference) by fixed maps of two drawn people and
  a drawn hand, the hand boxes, the four-scale hand maps, the keypoints of all four hands and the
  drawn image are the reference's (2 px bone lines: OpenCV's sub-pixel outline walk is reproduced
  to within a few pixels per line, see the tolerance below)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("cv2", reason="the test oracles (make setup) are not installed")
pytest.importorskip("skimage", reason="the test oracles (make setup) are not installed")

from service.models.controlnet import openpose, openpose_draw  # noqa: E402
from service.models.controlnet.openpose_net import FacePoseNet, HandPoseNet, load_face, load_hand  # noqa: E402
from tests.models.test_controlnet_openpose import DrawnPeople, figure  # noqa: E402
from tests.support import openpose_files  # noqa: E402


@pytest.mark.parametrize("part", ["hand", "face"])
def test_network_loads_by_its_published_names(tmp_path: Path, part: str) -> None:
    """Random weights saved under the reference's names (hand: its transfer drops the first name
    component; facenet.pth holds FaceNet's own names) load into ours and compute the same maps."""
    op = openpose_files.reference()
    torch.manual_seed(0)
    if part == "hand":
        ref, load, cls = op.model.handpose_model().eval(), load_hand, HandPoseNet
        state = {k.split(".", 1)[1]: v for k, v in ref.state_dict().items()}
    else:
        ref, load, cls = op.face.FaceNet().eval(), load_face, FacePoseNet
        state = ref.state_dict()
    path = tmp_path / f"{part}.pth"
    torch.save(state, path)
    with torch.device("meta"):
        assert set(cls().file_keys().values()) == set(state)
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        want = ref(x) if part == "hand" else ref(x)[-1]  # FaceNet returns every stage's maps
        assert torch.equal(load(path)(x), want)


# 21 hand keypoints as fractions of the crop: the wrist, then four joints for each finger
HAND = [(0.5, 0.9)] + [(0.15 + 0.175 * f, 0.7 - 0.13 * j) for f in range(5) for j in range(4)]


class DrawnMaps(torch.nn.Module):
    """Stands in for the hand (or face) network: a blob per keypoint at the same place in any
    input square, then the background channel."""

    def __init__(self, points: list[tuple[float, float]], sigma: float) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.points, self.sigma = points, sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return blob_maps(self.points, x.shape[-1] // 8, self.sigma)


def DrawnHand() -> DrawnMaps:  # noqa: N802 (a stand-in network, named as the classes it sits with)
    return DrawnMaps(HAND, 0.04)


def blob_maps(points: list[tuple[float, float]], g: int, sigma: float) -> torch.Tensor:
    """[1, len(points) + 1, g, g]: a Gaussian blob (sigma: a fraction of g) at each point
    (fractions of the square), then the background channel (1 - the largest)."""
    yy, xx = np.mgrid[0:g, 0:g].astype(np.float64)
    out = np.zeros((len(points) + 1, g, g))
    for i, (fx, fy) in enumerate(points):
        out[i] = np.exp(-((yy - fy * g) ** 2 + (xx - fx * g) ** 2) / (2 * (sigma * g) ** 2))
    out[-1] = 1 - out[:-1].max(axis=0)
    return torch.from_numpy(out[None]).float()


def _reference(img: np.ndarray, body: torch.nn.Module, hand: torch.nn.Module) -> tuple[Any, np.ndarray]:
    op = openpose_files.reference()
    b, h = object.__new__(op.Body), object.__new__(op.Hand)
    b.model, h.model = body, hand
    detector = op.OpenposeDetector(b, h)
    poses = detector.detect_poses(img, include_hand=True)
    return poses, op.draw_poses(poses, *img.shape[:2], draw_body=True, draw_hand=True, draw_face=False)


def test_hands_found_and_drawn_as_controlnet_aux(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body, hand = DrawnPeople(), DrawnHand()
    img = figure(256, 512)
    poses, want = _reference(img, body, hand)
    assert len(poses) == 2 and all(p.left_hand and p.right_hand for p in poses)
    # the module end to end (its networks swapped for the same stand-ins)
    folder = tmp_path / "annotators"
    folder.mkdir()
    for name in (openpose.BODY_FILE, openpose.HAND_FILE):
        (folder / name).write_bytes(b"")
    assert openpose.available(folder) == ["openpose", "openpose_hand"]
    monkeypatch.setattr(
        openpose, "_net", lambda path, load, device=None: body if path.name == openpose.BODY_FILE else hand
    )
    hands: list[Any] = []
    draw = openpose_draw.draw_hand
    monkeypatch.setattr(
        openpose_draw, "draw_hand", lambda canvas, kps: (hands.append(kps), draw(canvas, kps))[1]
    )
    got = openpose.run(folder, "openpose_hand", img)
    # the four hands' keypoints: the reference's, to the float32 they are held in
    ref = [[(k.x, k.y) for k in hand] for p in poses for hand in (p.left_hand, p.right_hand)]
    assert np.array_equal(np.array(hands, np.float32), np.array(ref, np.float32))
    assert (np.array(hands) > 0).all()  # every keypoint found
    drawn = (want > 0).any(axis=2)
    differ = (got != want).any(axis=2)
    assert drawn.sum() > 3000 and differ.sum() <= 0.005 * drawn.sum(), (differ.sum(), drawn.sum())

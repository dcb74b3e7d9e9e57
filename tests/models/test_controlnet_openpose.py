"""The ``openpose`` preprocessor against controlnet_aux 0.0.10's OpenposeDetector (the ControlNet
v1.1 annotator code the A1111 extension runs) on the same ``body_pose_model.pth``: a random file
with the published key names (tests/support/openpose_files.py).

- Random weights on a picture of a figure: the resized heatmaps and PAFs agree to float32 rounding,
  the peaks and the people are the same, and the drawn pose image is the reference's pixel for pixel.
- A network replaced (in both) by fixed maps of two drawn people: both find the same two people,
  every keypoint, and draw the same figure (the association and drawing on real structure).
- The file loads by its published names; a file missing one is refused naming it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("cv2", reason="the test oracles (make setup) are not installed")

from service.models.controlnet import openpose, openpose_body, openpose_draw  # noqa: E402
from service.models.controlnet.openpose_net import BodyPoseNet, PoseWeightsError, load_body  # noqa: E402
from tests.support import openpose_files  # noqa: E402


def figure(h: int, w: int) -> np.ndarray:
    """A light picture with a dark head, a torso, arms and legs (RGB)."""
    img = np.full((h, w, 3), 200, np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    img[((yy - h * 0.2) ** 2 + (xx - w * 0.5) ** 2) < (h * 0.07) ** 2] = (40, 30, 20)
    img[int(h * 0.27) : int(h * 0.6), int(w * 0.45) : int(w * 0.55)] = (30, 60, 200)
    img[int(h * 0.3) : int(h * 0.34), int(w * 0.2) : int(w * 0.8)] = (30, 60, 200)
    for left in (0.38, 0.56):
        img[int(h * 0.6) : int(h * 0.95), int(w * left) : int(w * (left + 0.06))] = (20, 20, 120)
    return img


@pytest.fixture(scope="module")
def body_file() -> Path:
    return openpose_files.shared_body_model()


@pytest.fixture(scope="module")
def nets(body_file: Path) -> tuple[Any, BodyPoseNet]:
    return openpose_files.reference_detector(body_file), load_body(body_file)


def _reference_run(detector: Any, img: np.ndarray) -> dict[str, Any]:
    """The reference's pose image, with its resized maps and its people caught on the way."""
    op = openpose_files.reference()
    caught: dict[str, Any] = {"maps": []}
    resize = op.util.smart_resize
    fmt = detector.body_estimation.format_body_result

    def spy_resize(x: np.ndarray, s: Any) -> np.ndarray:
        out = resize(x, s)
        if x.ndim == 3 and x.shape[2] in (19, 38):  # the heatmaps, then the PAFs, at the image size
            caught["maps"].append(out)
        return out

    def spy_format(candidate: np.ndarray, subset: np.ndarray) -> Any:
        caught["candidate"], caught["subset"] = np.asarray(candidate, np.float64).reshape(-1, 4), subset
        return fmt(candidate, subset)

    op.util.smart_resize, detector.body_estimation.format_body_result = spy_resize, spy_format
    try:
        short = min(img.shape[:2])  # sides multiples of 64: the detector's own resizes are identities
        caught["image"] = detector(img, detect_resolution=short, image_resolution=short, output_type="np")
    finally:
        op.util.smart_resize = resize
        del detector.body_estimation.format_body_result
    return caught


def _drawn(cand: np.ndarray, people: np.ndarray, h: int, w: int) -> np.ndarray:
    """Our pose image of the people found (as openpose.run draws them)."""
    canvas = np.zeros((h, w, 3), np.uint8)
    for body in openpose_body.bodies(cand, people):
        openpose_draw.draw_body(canvas, openpose_body.normalised(body, h, w))
    return canvas


def _same_people(net: torch.nn.Module, img: np.ndarray, ref: dict[str, Any]) -> np.ndarray:
    """Our maps, peaks, people and pose image equal the reference's; returns the people rows."""
    heat, paf = openpose_body.body_maps(net, np.ascontiguousarray(img[:, :, ::-1]))  # type: ignore[arg-type]
    assert np.abs(heat - ref["maps"][0]).max() < 1e-5 and np.abs(paf - ref["maps"][1]).max() < 1e-5
    cand, people = openpose_body.assemble(openpose_body.find_peaks(heat), paf, img.shape[0])
    assert cand.shape == ref["candidate"].shape
    assert np.array_equal(cand[:, [0, 1, 3]], ref["candidate"][:, [0, 1, 3]])  # x, y, id
    assert np.allclose(cand[:, 2], ref["candidate"][:, 2], atol=1e-5)  # the peak's value
    assert people.shape == ref["subset"].shape
    assert np.array_equal(people[:, :18], ref["subset"][:, :18]) and np.allclose(
        people, ref["subset"], atol=1e-4
    )
    assert np.array_equal(_drawn(cand, people, *img.shape[:2]), ref["image"])
    return people


def _extension_input(img: np.ndarray, res: int) -> np.ndarray:
    """What the A1111 extension hands its OpenPose detector (its resize_image_with_pad, by OpenCV):
    the short side scaled to ``res``, then edge pixels repeated to multiples of 64."""
    import cv2

    h, w = img.shape[:2]
    k = res / min(h, w)
    th, tw = int(np.round(h * k)), int(np.round(w * k))
    scaled = cv2.resize(img, (tw, th), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    return np.pad(scaled, ((0, -th % 64), (0, -tw % 64), (0, 0)), mode="edge")


def test_random_weights_match_controlnet_aux(nets: tuple[Any, BodyPoseNet], tmp_path: Path) -> None:
    """A 200x150 picture at processor_res 128 (171x128, detected on 192x128 as the extension pads)."""
    detector, net = nets
    img = figure(200, 150)
    padded = _extension_input(img, 128)
    ref = _reference_run(detector, padded)
    assert np.ptp(ref["maps"][0][:, :, :18]) > 0.3 and len(ref["candidate"]) > 20  # maps with peaks
    assert len(_same_people(net, padded, ref)) >= 1
    assert (ref["image"] > 0).any(axis=2).sum() > 500  # a figure was drawn
    openpose_files.link_body_model(tmp_path)
    ours = openpose.run(tmp_path / "annotators", "openpose", img, 128)  # scaled, padded, cropped
    assert ours.shape == (171, 128, 3) and np.array_equal(ours, ref["image"][:171, :128])
    # the service's device given, the CPU here: the same path, bit for bit
    on_cpu = openpose.run(tmp_path / "annotators", "openpose", img, 128, torch.device("cpu"))
    assert np.array_equal(on_cpu, ours)


LIMB_SEGMENTS = openpose_body.LIMB_PAIRS


def _person(col: float) -> list[tuple[float, float]]:
    """18 keypoints (row, col) on the 1/8 grid, COCO order."""
    r = [(3, 0), (6, 0), (6, -3), (10, -5), (14, -6), (6, 3), (10, 5), (14, 6), (13, -2), (17, -2), (21, -2)]
    r += [(13, 2), (17, 2), (21, 2), (2, -1), (2, 1), (3, -2), (3, 2)]
    return [(float(y), float(x) + col) for y, x in r]


class DrawnPeople(torch.nn.Module):
    """Stands in for the network: heatmaps with a blob at each keypoint and PAFs along each limb of
    two people, on the 1/8 grid of whatever input it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gh, gw = x.shape[-2] // 8, x.shape[-1] // 8
        yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float64)
        heat = np.zeros((19, gh, gw))
        paf = np.zeros((38, gh, gw))
        for col in (gw * 0.27, gw * 0.7):
            kp = _person(col)
            for i, (y, x0) in enumerate(kp):
                heat[i] = np.maximum(heat[i], np.exp(-((yy - y) ** 2 + (xx - x0) ** 2) / (2 * 0.7**2)))
            for (a, b), (cx, cy) in zip(LIMB_SEGMENTS, openpose_body.LIMB_PAFS, strict=True):
                (ya, xa), (yb, xb) = kp[a], kp[b]
                d = np.array([xb - xa, yb - ya])
                n = float(np.hypot(*d))
                t = np.clip(((xx - xa) * d[0] + (yy - ya) * d[1]) / (n * n), 0, 1)
                near = np.hypot(xx - (xa + t * d[0]), yy - (ya + t * d[1])) <= 1.0
                paf[cx][near], paf[cy][near] = d[0] / n, d[1] / n
        heat[18] = 1 - heat[:18].max(axis=0)
        return torch.from_numpy(paf[None]).float(), torch.from_numpy(heat[None]).float()


def test_two_drawn_people_found_and_drawn_as_controlnet_aux(nets: tuple[Any, BodyPoseNet]) -> None:
    detector, _ = nets
    fake = DrawnPeople()
    img = figure(256, 512)
    real = detector.body_estimation.model
    detector.body_estimation.model = fake
    try:
        ref = _reference_run(detector, img)
    finally:
        detector.body_estimation.model = real
    people = _same_people(fake, img, ref)
    assert len(people) == 2 and list(people[:, 19]) == [18, 18]  # both people, every keypoint


def test_file_loads_by_its_published_names(tmp_path: Path) -> None:
    """Our names and shapes are the reference's (the file's); a file without them is refused."""
    keys = openpose_files.reference_keys()
    with torch.device("meta"):
        net = BodyPoseNet()
    assert {net.file_keys()[k]: tuple(v.shape) for k, v in net.state_dict().items()} == keys
    broken = tmp_path / "body_pose_model.pth"
    torch.save({"conv1_1.weight": torch.zeros(64, 3, 3, 3)}, broken)  # the rest missing
    with pytest.raises(PoseWeightsError, match="no tensor 'conv1_1.bias'"):
        load_body(broken)
    torch.save({"conv1_1.weight": torch.zeros(64, 3, 5, 5)}, broken)
    with pytest.raises(PoseWeightsError, match=r"'conv1_1.weight' is \(64, 3, 5, 5\)"):
        load_body(broken)
    torch.save([1, 2], broken)
    with pytest.raises(PoseWeightsError, match="no state dict"):
        load_body(broken)

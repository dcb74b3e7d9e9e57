"""The OpenPose body network (Cao et al. 2017, "Realtime Multi-Person 2D Pose Estimation using Part
Affinity Fields"; CMU's COCO model as lllyasviel's ``body_pose_model.pth`` carries it).

A VGG-19 front (to conv4_2) and two CPM convolutions make 128 features at 1/8 of the input; six
stages then refine two branches: L1, 38 part-affinity-field channels (19 limbs x (x, y)), and L2,
19 heatmaps (18 COCO keypoints and the background). Stage 1 reads the features; each later stage
reads its predecessor's two outputs and the features again (38 + 19 + 128 = 185 channels).

Parameters are named as in the published file (``conv1_1.weight``, ``conv5_5_CPM_L2.bias``,
``Mconv7_stage6_L1.weight``, ...), so the file loads by name. Every convolution is followed by a
ReLU except each stage's last; as in the annotator the A1111 extension and controlnet_aux run, the
stage-6 heatmap convolution *is* followed by one (their list of layers without ReLU names the
stage-6 PAF layer twice and the heatmap layer not at all), which clips negative heatmap values.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor, nn

# (name, in, out, kernel); "pool": 2x2 max pooling
_FRONT: list[tuple[str, int, int, int] | str] = [
    ("conv1_1", 3, 64, 3),
    ("conv1_2", 64, 64, 3),
    "pool",
    ("conv2_1", 64, 128, 3),
    ("conv2_2", 128, 128, 3),
    "pool",
    ("conv3_1", 128, 256, 3),
    ("conv3_2", 256, 256, 3),
    ("conv3_3", 256, 256, 3),
    ("conv3_4", 256, 256, 3),
    "pool",
    ("conv4_1", 256, 512, 3),
    ("conv4_2", 512, 512, 3),
    ("conv4_3_CPM", 512, 256, 3),
    ("conv4_4_CPM", 256, 128, 3),
]
PAF, HEAT, FEATURES = 38, 19, 128
STAGES = 6

Spec = tuple[str, int, int, int] | str


def _stage_layers(names: list[str], cin: int, out: int) -> list[tuple[str, int, int, int]]:
    """A refinement stage: five 7x7 convolutions, a 1x1, and the 1x1 to the outputs."""
    return [
        (names[0], cin, 128, 7),
        *[(n, 128, 128, 7) for n in names[1:5]],
        (names[5], 128, 128, 1),
        (names[6], 128, out, 1),
    ]


def _stage(stage: int, branch: int, out: int) -> list[tuple[str, int, int, int]]:
    """One stage's layers for branch 1 (PAFs) or 2 (heatmaps)."""
    if stage == 1:
        names = [f"conv5_{i}_CPM_L{branch}" for i in range(1, 6)]
        return [
            (names[0], FEATURES, 128, 3),
            (names[1], 128, 128, 3),
            (names[2], 128, 128, 3),
            (names[3], 128, 512, 1),
            (names[4], 512, out, 1),
        ]
    names = [f"Mconv{i}_stage{stage}_L{branch}" for i in range(1, 8)]
    return _stage_layers(names, PAF + HEAT + FEATURES, out)


class _PoseNet(nn.Module):
    """Convolutions named as in the published file, run as lists of names ("pool": 2x2 max)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleDict()

    def _add_all(self, specs: list[Spec]) -> list[str]:
        names = []
        for spec in specs:
            if isinstance(spec, str):
                names.append(spec)
                continue
            name, cin, cout, k = spec
            self.layers[name] = nn.Conv2d(cin, cout, k, padding=k // 2)
            names.append(name)
        return names

    def _run(self, names: list[str], x: Tensor, last_relu: bool) -> Tensor:
        for i, name in enumerate(names):
            if name == "pool":
                x = nn.functional.max_pool2d(x, 2, 2)
                continue
            x = self.layers[name](x)
            if i < len(names) - 1 or last_relu:
                x = torch.relu(x)
        return x

    def file_keys(self) -> dict[str, str]:
        """Our parameter name -> the file's key (``layers.conv1_1.weight`` -> ``conv1_1.weight``)."""
        return {k: k.split(".", 1)[1] for k in self.state_dict()}


class BodyPoseNet(_PoseNet):
    """PAFs [N, 38, H/8, W/8] and heatmaps [N, 19, H/8, W/8] from a BGR image scaled to [-0.5, 0.5)."""

    def __init__(self) -> None:
        super().__init__()
        self.front = self._add_all(list(_FRONT))
        self.branches: list[tuple[list[str], list[str]]] = []
        for stage in range(1, STAGES + 1):
            paf = self._add_all(list(_stage(stage, 1, PAF)))
            heat = self._add_all(list(_stage(stage, 2, HEAT)))
            self.branches.append((paf, heat))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self._run(self.front, x, True)
        inp = features
        paf = heat = features
        for stage, (paf_layers, heat_layers) in enumerate(self.branches, start=1):
            paf = self._run(paf_layers, inp, False)
            heat = self._run(heat_layers, inp, stage == STAGES)  # the published quirk (module doc)
            inp = torch.cat([paf, heat, features], 1)
        return paf, heat


HAND_PARTS = 22  # 21 hand keypoints and the background
_HAND_FRONT: list[Spec] = [
    *_FRONT[:13],  # VGG-19 to conv4_2, as the body's
    ("conv4_3", 512, 512, 3),
    ("conv4_4", 512, 512, 3),
    ("conv5_1", 512, 512, 3),
    ("conv5_2", 512, 512, 3),
    ("conv5_3_CPM", 512, 128, 3),
]


class _CascadeNet(_PoseNet):
    """The hand and face networks' shape: the VGG front to conv5_3_CPM, then one branch of six
    stages, each later stage reading the previous output and the features."""

    def __init__(self, parts: int) -> None:
        super().__init__()
        self.front = self._add_all(_HAND_FRONT)
        self.stages = [self._add_all([("conv6_1_CPM", FEATURES, 512, 1), ("conv6_2_CPM", 512, parts, 1)])]
        for t in range(2, STAGES + 1):
            names = [f"Mconv{i}_stage{t}" for i in range(1, 8)]
            self.stages.append(self._add_all(list(_stage_layers(names, parts + FEATURES, parts))))

    def forward(self, x: Tensor) -> Tensor:
        features = self._run(self.front, x, True)
        out = self._run(self.stages[0], features, False)
        for layers in self.stages[1:]:
            out = self._run(layers, torch.cat([out, features], 1), False)
        return out


class HandPoseNet(_CascadeNet):
    """The hand network (Simon et al. 2017, lllyasviel's ``hand_pose_model.pth``): heatmaps
    [N, 22, H/8, W/8] (21 keypoints and the background) from a BGR crop scaled to [-0.5, 0.5)."""

    def __init__(self) -> None:
        super().__init__(HAND_PARTS)


FACE_PARTS = 71  # 70 face landmarks and the background


class FacePoseNet(_CascadeNet):
    """The face network (OpenPose's face model, lllyasviel's ``facenet.pth``): heatmaps
    [N, 71, H/8, W/8] from a BGR crop scaled to [-0.5, 0.5)."""

    def __init__(self) -> None:
        super().__init__(FACE_PARTS)


class PoseWeightsError(ValueError):
    """A weight file that is not the network it is named for (the message names the key)."""


def load_state(path: Path) -> dict[str, Tensor]:
    """A ``.pth`` state dict as tensors only (no pickled code runs), or a ``.safetensors`` file."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or pickled code weights_only refuses
        raise PoseWeightsError(f"{path.name} is not a readable weight file ({type(exc).__name__})") from exc
    if not isinstance(state, dict):
        raise PoseWeightsError(f"{path.name} holds no state dict")
    return state


def _load(path: Path, net: _PoseNet, what: str) -> None:
    """Every parameter from the file by its published name (present, of the published shape)."""
    state = load_state(path)
    ours = net.state_dict()
    mapped = {}
    for name, key in net.file_keys().items():
        value = state.get(key)
        if not isinstance(value, Tensor):
            raise PoseWeightsError(f"{path.name} has no tensor {key!r}: not an OpenPose {what} model")
        if value.shape != ours[name].shape:
            raise PoseWeightsError(
                f"{path.name}: {key!r} is {tuple(value.shape)}, "
                f"the {what} network's is {tuple(ours[name].shape)}"
            )
        mapped[name] = value.float()
    net.load_state_dict(mapped, assign=True)


N = TypeVar("N", bound=_PoseNet)


def _loaded(path: Path, cls: type[N], what: str) -> N:
    with torch.device("meta"):  # no initialisation: every parameter comes from the file
        net = cls()
    _load(path, net, what)
    return net.eval()


def load_body(path: Path) -> BodyPoseNet:
    """The body network with the file's weights."""
    return _loaded(path, BodyPoseNet, "body")


def load_hand(path: Path) -> HandPoseNet:
    """The hand network with the file's weights."""
    return _loaded(path, HandPoseNet, "hand")


def load_face(path: Path) -> FacePoseNet:
    """The face network with the file's weights."""
    return _loaded(path, FacePoseNet, "face")

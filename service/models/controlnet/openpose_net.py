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
    n = [f"Mconv{i}_stage{stage}_L{branch}" for i in range(1, 8)]
    first = [(n[0], PAF + HEAT + FEATURES, 128, 7)]
    middle = [(name, 128, 128, 7) for name in n[1:5]]
    return [*first, *middle, (n[5], 128, 128, 1), (n[6], 128, out, 1)]


class BodyPoseNet(nn.Module):
    """PAFs [N, 38, H/8, W/8] and heatmaps [N, 19, H/8, W/8] from a BGR image scaled to [-0.5, 0.5)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleDict()
        self.front: list[str] = []
        for spec in _FRONT:
            self.front.append(self._add(spec) if not isinstance(spec, str) else spec)
        self.branches: list[tuple[list[str], list[str]]] = []
        for stage in range(1, STAGES + 1):
            paf = [self._add(s) for s in _stage(stage, 1, PAF)]
            heat = [self._add(s) for s in _stage(stage, 2, HEAT)]
            self.branches.append((paf, heat))

    def _add(self, spec: tuple[str, int, int, int]) -> str:
        name, cin, cout, k = spec
        self.layers[name] = nn.Conv2d(cin, cout, k, padding=k // 2)
        return name

    def _run(self, names: list[str], x: Tensor, last_relu: bool) -> Tensor:
        for i, name in enumerate(names):
            if name == "pool":
                x = nn.functional.max_pool2d(x, 2, 2)
                continue
            x = self.layers[name](x)
            if i < len(names) - 1 or last_relu:
                x = torch.relu(x)
        return x

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self._run(self.front, x, True)
        inp = features
        paf = heat = features
        for stage, (paf_layers, heat_layers) in enumerate(self.branches, start=1):
            paf = self._run(paf_layers, inp, False)
            heat = self._run(heat_layers, inp, stage == STAGES)  # the published quirk (module doc)
            inp = torch.cat([paf, heat, features], 1)
        return paf, heat

    def file_keys(self) -> dict[str, str]:
        """Our parameter name -> the file's key (``layers.conv1_1.weight`` -> ``conv1_1.weight``)."""
        return {k: k.split(".", 1)[1] for k in self.state_dict()}


class PoseWeightsError(ValueError):
    """A weight file that is not the network it is named for (the message names the key)."""


def load_state(path: Path) -> dict[str, Tensor]:
    """A ``.pth`` state dict as tensors only (no pickled code runs), or a ``.safetensors`` file."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise PoseWeightsError(f"{path.name} holds no state dict")
    return state


def load_body(path: Path) -> BodyPoseNet:
    """The body network with the file's weights (every key present and of the published shape)."""
    state = load_state(path)
    with torch.device("meta"):  # no initialisation: every parameter comes from the file
        net = BodyPoseNet()
    ours = net.state_dict()
    mapped = {}
    for name, key in net.file_keys().items():
        value = state.get(key)
        if not isinstance(value, Tensor):
            raise PoseWeightsError(f"{path.name} has no tensor {key!r}: not an OpenPose body model")
        if value.shape != ours[name].shape:
            raise PoseWeightsError(
                f"{path.name}: {key!r} is {tuple(value.shape)}, "
                f"the body network's is {tuple(ours[name].shape)}"
            )
        mapped[name] = value.float()
    net.load_state_dict(mapped, assign=True)
    return net.eval()

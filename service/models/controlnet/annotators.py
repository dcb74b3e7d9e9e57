"""Preprocessors that need downloaded weights, from ``model_store/annotators/``; each is listed (and
accepted as a unit's ``module``) only while its weights are there.

- ``depth_anything``: Depth Anything in the transformers layout (``annotators/depth_anything/``:
  ``config.json`` + ``model.safetensors`` + ``preprocessor_config.json``, as
  ``LiheYoung/depth-anything-small-hf`` publishes it). The network is transformers'
  ``DepthAnythingForDepthEstimation`` (as the IP-Adapter's CLIP image encoder is transformers'
  model); the image goes in as its image processor prepares it (published settings: the side
  closest to 518 scaled to 518 keeping the aspect, both sides rounded to multiples of 14, bicubic,
  ImageNet mean / std) and the relative depth comes out as transformers' depth-estimation pipeline
  renders it: bicubic back to the image's size, then (d - min) / (max - min) * 255, white = near.

- ``openpose``: OpenPose body keypoints drawn as the stick figure ControlNet's openpose models
  read (``openpose_body``), from lllyasviel's ``body_pose_model.pth`` (huggingface
  ``lllyasviel/Annotators``) at ``annotators/body_pose_model.pth`` or
  ``annotators/openpose/body_pose_model.pth`` (the A1111 extension's downloads folder layout).

Each network is loaded once per file version and kept in the process cache ``annotator_cache``
(at most 8 networks, least recently used dropped; a replaced file loads anew): about 100 MB for
the small depth model, 200 MB for the body pose model, 150 MB each for the hand and face models,
outside KDIFF_MEMORY_BUDGET. The pose networks run on the service's device (CUDA memory there);
Depth Anything runs on the CPU.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from service.models.file_names import is_file

from . import openpose
from .annotator_cache import NETWORKS, Device
from .openpose_net import PoseWeightsError

FOLDER = "annotators"
DEPTH = "depth_anything"
SIZE, MULTIPLE = 518, 14
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# the files a Depth Anything folder loads from: any of them replaced (or added) loads it anew
DEPTH_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


def _depth_folder(root: Path) -> Path:
    return Path(root) / FOLDER / DEPTH


def available(root: Path) -> list[str]:
    """The model-based modules whose weights are in the store."""
    d = _depth_folder(root)
    depth = [DEPTH] if is_file(d / "config.json") and is_file(d / "model.safetensors") else []
    return [*depth, *openpose.available(Path(root) / FOLDER)]


@dataclass(frozen=True)
class Processing:
    """The image processor's settings (the folder's preprocessor_config.json, else the published)."""

    size: tuple[int, int] = (SIZE, SIZE)
    multiple: int = MULTIPLE
    mean: tuple[float, ...] = MEAN
    std: tuple[float, ...] = STD

    @classmethod
    def of(cls, folder: Path) -> Processing:
        path = folder / "preprocessor_config.json"
        raw = json.loads(path.read_text()) if path.is_file() else {}
        size = raw.get("size") or {}
        return cls(
            (int(size.get("height", SIZE)), int(size.get("width", SIZE))),
            int(raw.get("ensure_multiple_of", MULTIPLE)),
            tuple(raw.get("image_mean", MEAN)),
            tuple(raw.get("image_std", STD)),
        )

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """Scale as little as possible so that one side is the target's, keep the aspect, then
        each side to the nearest multiple (Python's round: halves to even)."""
        sh, sw = self.size[0] / height, self.size[1] / width
        s = sw if abs(1 - sw) < abs(1 - sh) else sh
        m = self.multiple
        return max(m, round(s * height / m) * m), max(m, round(s * width / m) * m)


def _load_depth(folder: Path) -> tuple[Any, Processing]:
    from transformers import DepthAnythingForDepthEstimation

    net = DepthAnythingForDepthEstimation.from_pretrained(str(folder)).eval()
    return net, Processing.of(folder)


def _network(root: Path) -> tuple[Any, Processing]:
    folder = _depth_folder(root).resolve()
    return NETWORKS.get([folder / f for f in DEPTH_FILES], lambda: _load_depth(folder))


def depth_anything(root: Path, img: np.ndarray) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> the relative depth as RGB uint8 [H, W, 3] (white = near)."""
    net, proc = _network(root)
    h, w = img.shape[:2]
    ih, iw = proc.input_size(h, w)
    resized = np.asarray(Image.fromarray(img).resize((iw, ih), Image.Resampling.BICUBIC), np.float32)
    x = (resized / 255 - np.array(proc.mean, np.float32)) / np.array(proc.std, np.float32)
    pixels = torch.from_numpy(x).permute(2, 0, 1)[None].float()
    with torch.inference_mode():
        depth = net(pixel_values=pixels).predicted_depth[:, None]
        depth = torch.nn.functional.interpolate(depth, size=(h, w), mode="bicubic", align_corners=False)[0, 0]
    d = depth.numpy()
    span = float(d.max() - d.min())
    d = (d - d.min()) / (span if span > 0 and math.isfinite(span) else 1.0)
    return np.repeat((d * 255).astype(np.uint8)[:, :, None], 3, axis=2)


# modules that take the image at its own size and the resolution (they scale as the extension does)
SCALES_ITSELF = frozenset(openpose.MODULES)
WeightsError = PoseWeightsError  # a weight file that is not the network it is named for


def run(
    root: Path, name: str, img: np.ndarray, resolution: int | None = None, device: Device = None
) -> np.ndarray:
    """A model-based module on an RGB uint8 image; the pose networks run on ``device`` (None: the
    CPU), Depth Anything on the CPU."""
    if name == DEPTH:
        return depth_anything(root, img)
    if name in openpose.MODULES:
        return openpose.run(Path(root) / FOLDER, name, img, resolution, device)
    raise KeyError(name)

"""In-memory image datasets: scikit-learn's bundled digits and a folder of PIL-readable images.

Both yield images in [-1, 1] as float tensors [N, C, S, S] plus integer class labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

DIGITS_SPLIT_SEED = 0  # fixed so every run (and the eval) sees the same held-out digits
DIGITS_TEST_FRACTION = 0.2
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DatasetError(ValueError):
    """The dataset is empty, unreadable or inconsistent with the model config."""


@dataclass
class ImageData:
    images: Tensor  # [N, C, S, S] in [-1, 1]
    labels: Tensor  # [N] long
    num_classes: int  # 0 when unlabelled

    def __len__(self) -> int:
        return int(self.images.shape[0])


def digits(split: str = "train", image_size: int = 16) -> ImageData:
    """sklearn's 8x8 digits (1,797 images), bilinearly resized, with a fixed 80/20 split."""
    from sklearn.datasets import load_digits

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be train, test or all, not {split!r}")
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0  # pixel values are 0..16
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 2 - 1).contiguous()
    y = torch.tensor(bunch.target, dtype=torch.long)
    perm = torch.from_numpy(np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(y)))
    n_test = int(round(len(y) * DIGITS_TEST_FRACTION))
    idx = {"test": perm[:n_test], "train": perm[n_test:], "all": perm}[split]
    return ImageData(x[idx], y[idx], 10)


def _load_image(path: Path, image_size: int, channels: int) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as raw:
            im = raw.convert("L" if channels == 1 else "RGB")
        side = min(im.size)  # centre crop to a square, then resize
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side))
        im = im.resize((image_size, image_size), Image.Resampling.BICUBIC)
        arr = np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as e:
        raise DatasetError(f"cannot read image {path}: {e}") from e
    t = torch.from_numpy(arr.copy())
    t = t[None] if channels == 1 else t.permute(2, 0, 1)
    return t * 2 - 1


def image_folder(root: str | Path, image_size: int, channels: int = 3) -> ImageData:
    """All images under ``root``; images in sub-folders get the sub-folder (sorted) as class label."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}")
    class_names = sorted({p.parent.name for p in files if p.parent != root})
    labelled = bool(class_names) and all(p.parent != root for p in files)
    lookup = {name: i for i, name in enumerate(class_names)}
    images = torch.stack([_load_image(p, image_size, channels) for p in files])
    labels = torch.tensor([lookup[p.parent.name] if labelled else 0 for p in files], dtype=torch.long)
    return ImageData(images, labels, len(class_names) if labelled else 0)


def load_dataset(name: str, image_size: int, channels: int, split: str = "train") -> ImageData:
    """``digits`` or a path to an image folder; checks the channel count against the model."""
    if name == "digits":
        if channels != 1:
            raise DatasetError(f"digits are greyscale: the model needs in_channels=1, not {channels}")
        return digits(split, image_size)
    return image_folder(name, image_size, channels)

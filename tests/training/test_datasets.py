from __future__ import annotations

import pytest
import torch
from PIL import Image

from service.training.datasets import DatasetError, digits, image_folder, load_dataset


def test_digits_split_is_fixed_disjoint_and_complete() -> None:
    train, test, everything = digits("train", 8), digits("test", 8), digits("all", 8)
    assert (len(train), len(test), len(everything)) == (1438, 359, 1797)
    assert train.images.shape[1:] == (1, 8, 8) and train.num_classes == 10
    assert train.images.min() >= -1 and train.images.max() <= 1
    # train + test is a permutation of all images: compare sorted flattened rows
    joined = torch.cat([train.images, test.images]).flatten(1)
    assert torch.equal(joined.sum(1).sort().values, everything.images.flatten(1).sum(1).sort().values)
    assert torch.equal(digits("test", 8).images, test.images)  # same split every call
    assert set(test.labels.tolist()) == set(range(10))


def test_digits_upsampled() -> None:
    d = digits("test", 16)
    assert d.images.shape == (359, 1, 16, 16)


def test_digits_need_one_channel() -> None:
    with pytest.raises(DatasetError, match="greyscale"):
        load_dataset("digits", 16, 3)


def _write(path, color) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), color).save(path)


def test_image_folder_labels_from_subfolders(tmp_path) -> None:
    _write(tmp_path / "cats" / "a.png", (255, 0, 0))
    _write(tmp_path / "dogs" / "b.jpg", (0, 0, 255))
    _write(tmp_path / "dogs" / "c.png", (0, 0, 0))
    data = image_folder(tmp_path, 8, channels=3)
    assert data.images.shape == (3, 3, 8, 8) and data.num_classes == 2
    assert data.labels.tolist() == [0, 1, 1]
    assert data.images[0, 0].mean() > 0.9 and data.images[0, 2].mean() < -0.9  # red -> R high, B low
    grey = image_folder(tmp_path, 8, channels=1)
    assert grey.images.shape == (3, 1, 8, 8)


def test_image_folder_errors(tmp_path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        image_folder(tmp_path / "missing", 8)
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="no images"):
        image_folder(tmp_path, 8)
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match="cannot read image"):
        image_folder(tmp_path, 8)

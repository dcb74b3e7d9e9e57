"""Each key's ComfyUI files (service/api/comfy/files.py): names checked so nothing leaves the key's
folder, ComfyUI's renaming of a taken upload name, the output counter, the per-key bounds, and a
persistent folder read back after a restart, SaveImage's prefix variables."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from service.api.comfy.files import ComfyFiles, FileNameError
from service.api.comfy.prompts import png_size, split_prefix

from .standin import png


@pytest.mark.parametrize(
    ("subfolder", "name"),
    [
        ("", ".."),
        ("", "../x.png"),
        ("", "a/b.png"),
        ("", "a\\b.png"),
        ("", "x\x00.png"),
        ("..", "x.png"),
        ("a/../..", "x.png"),
    ],
)
def test_names_that_would_leave_the_folder_are_refused(tmp_path: Path, subfolder: str, name: str) -> None:
    files = ComfyFiles(tmp_path, 10, 2**20)
    with pytest.raises(FileNameError):
        files.save("k1", "input", subfolder, name, b"x", overwrite=False)
    with pytest.raises(FileNameError):
        files.read("k1", "input", subfolder, name)
    assert not any(tmp_path.parent.glob("x.png"))


def test_taken_names_counter_and_keys_apart(tmp_path: Path) -> None:
    files = ComfyFiles(tmp_path, 100, 2**20)
    assert [files.save("k1", "input", "", "a.png", bytes([i]), False) for i in range(3)] == [
        "a.png",
        "a (1).png",
        "a (2).png",
    ]
    assert files.save("k1", "input", "", "a.png", b"\x01", False) == "a (1).png"  # same bytes: reused
    assert files.save("k2", "input", "", "a.png", b"other", False) == "a.png"  # another key's space
    assert (
        files.read("k2", "input", "", "a.png") == b"other"
        and files.read("k1", "input", "", "a.png") == b"\x00"
    )
    names = [files.save_new("k1", "output", "sub", "ComfyUI", b"png") for _ in range(3)]
    assert names == ["ComfyUI_00001_.png", "ComfyUI_00002_.png", "ComfyUI_00003_.png"]
    assert files.names("k1", "input") == ["a (1).png", "a (2).png", "a.png"]


def test_bounds_per_key_and_a_folder_kept_across_restarts(tmp_path: Path) -> None:
    files = ComfyFiles(tmp_path, 3, 2**20)
    for i in range(5):
        files.save("k1", "input", "", f"f{i}.png", b"x" * 10, False)
    files.save("k2", "input", "", "mine.png", b"y", False)
    assert files.names("k1") == ["f2.png", "f3.png", "f4.png"] and files.names("k2") == ["mine.png"]
    again = ComfyFiles(tmp_path, 3, 25)  # a restart with a smaller byte bound
    again.save("k1", "output", "", "new.png", b"z" * 10, False)
    kept = again.names("k1", "input") + again.names("k1", "output")
    assert kept == ["f4.png", "new.png"], kept  # the oldest went first
    with pytest.raises(FileNameError):
        again.save("k1", "input", "", "huge.png", b"z" * 26, False)


def test_a_temporary_folder_is_made_on_use_and_removed() -> None:
    files = ComfyFiles(None, 3, 2**20)
    files.save(None, "temp", "", "t.png", b"x", False)
    root = files.root
    assert (root / "_anonymous" / "temp" / "t.png").is_file()
    files.close()
    assert not root.exists()


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("ComfyUI", ("", "ComfyUI")),
        ("people/alice", ("people", "alice")),
        ("../../../etc/evil", ("etc", "evil")),
        ("", ("", "ComfyUI")),
        ("a\x00b", ("", "a_b")),
    ],
)
def test_save_prefixes_split_as_comfyui_and_stay_inside(prefix: str, expected: tuple[str, str]) -> None:
    assert split_prefix(prefix) == expected


NOW = time.struct_time((2026, 3, 7, 4, 5, 6, 5, 66, 0))  # Saturday 7 March 2026, 04:05:06


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        # Open WebUI's dated folder: ComfyUI's compute_vars, month/day/hour/minute/second 2 digits
        ("%year%-%month%-%day%/img_%width%x%height%", ("2026-03-07", "img_16x8")),
        ("%hour%%minute%%second%_%year%", ("", "040506_2026")),
        # the frontend's %Node.widget% is not the backend's to expand (ComfyUI leaves it too)
        ("%KSampler.seed%_%width%", ("", "%KSampler.seed%_16")),
        ("%unknown%/%width", ("%unknown%", "%width")),
        # the expanded prefix still passes the checks: nothing leaves the folder
        ("../%year%/../../%month%/x", ("2026/03", "x")),
        ("%year%/..", ("", "2026")),
    ],
)
def test_save_prefix_variables_expand_as_comfyui(prefix: str, expected: tuple[str, str]) -> None:
    assert split_prefix(prefix, 16, 8, NOW) == expected


def test_the_size_comes_from_the_saved_png() -> None:
    assert png_size(png(0, size=24)) == (24, 24)
    assert png_size(b"not a png") == (0, 0)
    assert split_prefix("%width%x%height%", *png_size(b""))[1] == "0x0"  # ComfyUI's defaults

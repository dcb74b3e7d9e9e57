"""Each key's ComfyUI files (service/api/comfy/files.py): names checked so nothing leaves the key's
folder, ComfyUI's renaming of a taken upload name, the output counter, the per-key bounds, and a
persistent folder read back after a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.api.comfy.files import ComfyFiles, FileNameError
from service.api.comfy.prompts import split_prefix


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

"""Each key's ComfyUI files: ``input`` (uploads), ``output`` (SaveImage) and ``temp`` (PreviewImage)
folders under ``KDIFF_COMFY_DIR/<key id>/``, bounded per key in count and bytes (the oldest file goes
first), every name checked so nothing resolves outside the key's own folder.

ComfyUI keeps one set of folders for everyone and never removes a file; here a key sees only its own
files (``/view`` of another key's file is a 404, like a missing one) and a key cannot fill the disk.
The methods do blocking file I/O: the routes call them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

TYPES = ("input", "output", "temp")
MAX_NAME = 200  # characters of a file name (most file systems allow 255 bytes)
MAX_SUBFOLDER = 200
# A name or subfolder part: no separators, no NUL or control characters, not "." or "..".
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f/\\]")


class FileNameError(ValueError):
    """A name, subfolder or type that cannot be a file of the caller's (it would leave the folder,
    or is not a name at all). ComfyUI answers such a /view or upload with a bare 400 / 403."""


def check_name(name: str, what: str = "filename") -> str:
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        raise FileNameError(f"{what} must be 1 to {MAX_NAME} characters")
    if _BAD_CHARS.search(name) or name in (".", "..") or name.startswith(".."):
        raise FileNameError(f"{what} {name[:60]!r} is not a plain file name (no path separators or '..')")
    return name


def check_subfolder(subfolder: str) -> tuple[str, ...]:
    """The subfolder's parts ('' = none); ``a/b`` is allowed, anything leaving the folder is not."""
    if not isinstance(subfolder, str) or len(subfolder) > MAX_SUBFOLDER:
        raise FileNameError(f"subfolder must be text of at most {MAX_SUBFOLDER} characters")
    parts = [p for p in subfolder.replace("\\", "/").split("/") if p not in ("", ".")]
    return tuple(check_name(p, "subfolder") for p in parts)


def check_type(kind: str | None, default: str) -> str:
    kind = default if kind in (None, "") else kind
    if kind not in TYPES:
        raise FileNameError(f"type must be one of {', '.join(TYPES)}")
    return kind  # type: ignore[return-value]


class ComfyFiles:
    """The file store of every key (``owner``: a key id, None without keys)."""

    def __init__(self, root: Path | None, max_files: int, max_bytes: int) -> None:
        self._temporary = root is None
        self._root = None if root is None else Path(root)
        self.max_files, self.max_bytes = max_files, max_bytes
        self._lock = threading.RLock()
        # per owner: path -> size, oldest first (filled from the disk on the owner's first use)
        self._index: dict[str, OrderedDict[Path, int]] = {}

    @property
    def root(self) -> Path:
        """The folder, made on first use (an app that never stores a file leaves no folder behind)."""
        with self._lock:
            if self._root is None:
                self._root = Path(tempfile.mkdtemp(prefix="kdiff-comfy-"))
            self._root.mkdir(parents=True, exist_ok=True)
            return self._root

    def close(self) -> None:
        if self._temporary and self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    @staticmethod
    def _owner_dir(owner: str | None) -> str:
        # key ids are hex digests; anything else (never expected) is hashed into one
        if owner is None:
            return "_anonymous"
        return (
            owner
            if re.fullmatch(r"[0-9a-f]{1,64}", owner)
            else hashlib.sha256(owner.encode()).hexdigest()[:16]
        )

    def folder(self, owner: str | None, kind: str) -> Path:
        return self.root / self._owner_dir(owner) / check_type(kind, "input")

    def path(self, owner: str | None, kind: str, subfolder: str, filename: str) -> Path:
        """The file's path inside the owner's ``kind`` folder (checked; it need not exist)."""
        base = self.folder(owner, kind)
        path = base.joinpath(*check_subfolder(subfolder), check_name(filename))
        # belt and braces: after the checks above nothing can leave base, but symlinks could
        if os.path.commonpath([os.path.abspath(base), os.path.abspath(path)]) != os.path.abspath(base):
            raise FileNameError("the file would be outside its folder")
        return path

    def read(self, owner: str | None, kind: str, subfolder: str, filename: str) -> bytes:
        """The file's bytes; FileNotFoundError when the owner has no such file."""
        path = self.path(owner, kind, subfolder, filename)
        if not path.is_file() or path.is_symlink():
            raise FileNotFoundError(filename)
        return path.read_bytes()

    def names(self, owner: str | None, kind: str = "input") -> list[str]:
        """The owner's files of one kind, as LoadImage names them (``sub/name.png``), sorted."""
        base = self.folder(owner, kind)
        if not base.is_dir():
            return []
        return sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())

    def save(
        self, owner: str | None, kind: str, subfolder: str, filename: str, data: bytes, overwrite: bool
    ) -> str:
        """Store ``data``; the name it got. A name that exists gets `` (1)``, `` (2)``... before its
        extension unless ``overwrite`` (or the existing file has the same bytes: that one is reused),
        as ComfyUI's upload does."""
        path = self.path(owner, kind, subfolder, filename)
        with self._lock:
            if not overwrite:
                stem, ext = os.path.splitext(filename)
                i = 1
                while path.exists():
                    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
                        return path.name
                    path = path.with_name(check_name(f"{stem} ({i}){ext}"))
                    i += 1
            self._store(owner, path, data)
            return path.name

    def save_new(self, owner: str | None, kind: str, subfolder: str, prefix: str, data: bytes) -> str:
        """Store an output under ComfyUI's ``<prefix>_<counter:05>_.png`` with the next free counter."""
        folder = self.path(owner, kind, subfolder, "x").parent
        pattern = re.compile(re.escape(prefix) + r"_(\d+)_\.png$")
        with self._lock:
            used = [int(m.group(1)) for p in folder.glob("*.png") if (m := pattern.match(p.name))]
            name = f"{prefix}_{max(used, default=0) + 1:05}_.png"
            self._store(owner, folder / check_name(name), data)
            return name

    def _store(self, owner: str | None, path: Path, data: bytes) -> None:
        if len(data) > self.max_bytes:
            raise FileNameError(f"{len(data)} bytes is more than a key may keep ({self.max_bytes})")
        index = self._owned(owner)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # readers see the old file or the new one, never half of it
        index.pop(path, None)
        index[path] = len(data)
        total = sum(index.values())
        while len(index) > self.max_files or total > self.max_bytes:
            old, size = index.popitem(last=False)
            total -= size
            old.unlink(missing_ok=True)

    def _owned(self, owner: str | None) -> OrderedDict[Path, int]:
        key = self._owner_dir(owner)
        index = self._index.get(key)
        if index is None:  # first use since start: what an earlier run left, oldest first
            found = (
                [p for p in (self.root / key).rglob("*") if p.is_file()] if (self.root / key).is_dir() else []
            )
            found.sort(key=lambda p: p.stat().st_mtime)
            index = self._index[key] = OrderedDict((p, p.stat().st_size) for p in found)
        return index

"""Textual-inversion embeddings: A1111's files, found in the store and matched in prompts as A1111 does.

Files (read once each, again when their size or mtime changes; new files are picked up by prompts
within a second, no restart; listings and A1111's refresh-embeddings read the folders at once):

- ``model_store/embeddings/**`` (every model whose text encoders have the file's width) and
  ``model_store/<model>/embeddings/**`` (that model; its names win over the shared ones).
- ``.pt`` / ``.bin``: ``torch.load(weights_only=True)``; a file that needs Python code to load (a
  pickle beyond plain tensors and containers) is skipped with that reason, never run.
  ``.safetensors`` through safetensors.
- Layouts (A1111's ``EmbeddingDatabase.load_from_file``): ``{"string_to_param": {"*": [n, D]}, "name",
  "step", "sd_checkpoint", "sd_checkpoint_name", ...}`` (A1111's own training), ``{"clip_l": [n, 768],
  "clip_g": [n, 1280]}`` (SDXL), or one tensor alone (``emb_params`` of kohya's safetensors, a diffusers
  concept ``{"<token>": [D]}``).
- ``.png`` / ``.webp``: A1111's embedding images (the data in an ``sd-ti-embedding`` text chunk or
  hidden in the pixels; embedding_images.py, through the image gate); ``name.preview.png`` is a
  picture, not read.
- The name is the file's stem (A1111), or for an embedding image the ``name`` its data holds (A1111);
  a file that cannot be used is listed as skipped with its reason.

Matching (A1111's ``find_embedding_at_position``): every name is tokenized with the model's tokenizer
(no special tokens); while a prompt's tokens are read, at each position the longest name whose token
ids follow is replaced by the embedding's vectors. So a name matches where the prompt has the same
tokens: case does not matter, ``EasyNegative,`` matches ``EasyNegative`` but ``easy negative`` does not
(CLIP marks word ends), a name that is an ordinary word (``style``) replaces that word everywhere.
ComfyUI's ``embedding:name`` (also with the file's extension or its path below the folder) names one
explicitly: :func:`split_references`.
"""

from __future__ import annotations

import os
import pickle
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from service.models.file_names import model_folders

EXTENSIONS = (".pt", ".bin", ".safetensors")
IMAGE_EXTENSIONS = (".png", ".webp")  # A1111's embedding images (embedding_images.py); not ComfyUI's
FOLDER = "embeddings"
MAX_VECTORS = 75  # one CLIP chunk: A1111 never splits an embedding over two
MAX_WIDTH = 8192
MAX_FILE_BYTES = 32 << 20  # embeddings are kilobytes; a checkpoint put here by mistake is refused unread
MAX_FILES = 4096  # per scan: the folder walk stays bounded
RESCAN_S = 1.0  # prompts see new or changed files within this long (listings and refresh at once)
SDXL_KEYS = ("clip_l", "clip_g")  # the SDXL text encoders' parts, in encoder order
REFERENCE = re.compile(r"(?<!\S)embedding:(\S+)")  # ComfyUI's spelling, a whole word
_READS = count(1)


class EmbeddingFileError(ValueError):
    """A file that is not a usable embedding (the reason is listed under ``skipped``)."""


class EmbeddingError(ValueError):
    """A prompt names an embedding (``embedding:name``) this model does not have."""

    def __init__(self, message: str, allowed: list[str]) -> None:
        super().__init__(message)
        self.message, self.allowed = message, allowed


@dataclass(frozen=True)
class EmbeddingInfo:
    """One file: its vectors (``parts``: ``{"": [n, D]}`` or SDXL's ``clip_l``/``clip_g``) or why not."""

    name: str  # the file's stem: what prompts use (A1111)
    ref: str  # its path below the folder without the extension (ComfyUI's name)
    path: Path
    base_model: str | None  # the model folder it sits in; None: the shared folder
    parts: dict[str, Tensor] = field(default_factory=dict)
    vectors: int | None = None
    shape: int | None = None  # the width (SDXL: both parts' together, as A1111 reports it)
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    error: str | None = None
    serial: int = 0  # which read of the file this is (catalog keys change when a file is read again)

    def widths(self) -> list[int]:
        return [int(t.shape[-1]) for t in self.parts.values()]

    def describe(self, reason: str | None = None) -> dict[str, Any]:
        """A1111's entry of ``GET /sdapi/v1/embeddings``, plus ``reason`` for a skipped one."""
        out: dict[str, Any] = {
            "step": self.step,
            "sd_checkpoint": self.sd_checkpoint,
            "sd_checkpoint_name": self.sd_checkpoint_name,
            "shape": self.shape,
            "vectors": self.vectors,
        }
        if reason is not None:
            out["reason"] = reason
        return out


def _tensor(value: Any, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise EmbeddingFileError(f"{what} is a {type(value).__name__}, not a tensor")
    t = value.detach()
    if t.ndim == 1:
        t = t.unsqueeze(0)
    if t.ndim != 2 or not t.is_floating_point():
        raise EmbeddingFileError(
            f"{what} must be floating point [vectors, width], got {t.dtype} {list(t.shape)}"
        )
    n, width = t.shape
    if not 1 <= n <= MAX_VECTORS or not 1 <= width <= MAX_WIDTH:
        raise EmbeddingFileError(f"{what} has {n} vectors of width {width}; at most {MAX_VECTORS} vectors")
    t = t.float().contiguous()
    if not bool(torch.isfinite(t).all()):
        raise EmbeddingFileError(f"{what} has values that are not finite")
    return t


def _parts(data: Any) -> dict[str, Tensor]:
    """The vectors of a loaded file, by A1111's layouts (its order of checks)."""
    if not isinstance(data, dict):
        raise EmbeddingFileError(f"not an embedding: the file holds a {type(data).__name__}, not a dict")
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)  # a ParameterDict (torch 1.11): its dict
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingFileError("string_to_param must hold exactly one tensor (A1111's {'*': tensor})")
        return {"": _tensor(next(iter(params.values())), "string_to_param")}
    if all(k in data for k in SDXL_KEYS):
        parts = {k: _tensor(data[k], k) for k in SDXL_KEYS}
        if parts["clip_l"].shape[0] != parts["clip_g"].shape[0]:
            raise EmbeddingFileError("clip_l and clip_g have different numbers of vectors")
        return parts
    tensors = [k for k, v in data.items() if isinstance(v, Tensor)]
    if len(data) == 1 and tensors:
        return {"": _tensor(data[tensors[0]], repr(tensors[0]))}
    keys = ", ".join(repr(k) for k in list(data)[:8])
    raise EmbeddingFileError(
        f"not an embedding: expected string_to_param, emb_params, clip_l + clip_g or one tensor; found {keys}"
    )


def _load(path: Path) -> Any:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        # A1111 files saved with torch 1.11 hold string_to_param as a ParameterDict: a container whose
        # state is restored as data (no code of the file runs), so it is the one class allowed beyond
        # tensors and plain containers.
        with torch.serialization.safe_globals([torch.nn.ParameterDict]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        culprit = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), "")
        raise EmbeddingFileError(
            "refused: the file needs Python code to load (a pickle beyond plain tensors; only weights"
            " are read)" + (f": {culprit[:160]}" if culprit else "")
        ) from exc


def _embedding_file(path: Path) -> bool:
    """An embedding file by its extension; A1111's ``name.preview.png`` (a picture for the UI) is not."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return Path(path.stem).suffix.lower() != ".preview" and path.is_file()
    return suffix in EXTENSIONS and path.is_file()


def _load_image(path: Path) -> dict[str, Any]:
    """An A1111 embedding image's data, through the image gate (embedding_images.py)."""
    from service.image_gate import ImageInputError

    from .embedding_images import NoEmbedding, read

    try:
        return read(path.read_bytes())
    except NoEmbedding as exc:
        raise EmbeddingFileError(str(exc)) from exc
    except ImageInputError as exc:
        raise EmbeddingFileError(f"refused by the image gate: {exc.message}") from exc
    except ValueError as exc:
        raise EmbeddingFileError(str(exc)) from exc


def read_embedding(path: Path, name: str, ref: str, base_model: str | None) -> EmbeddingInfo:
    """One file as an :class:`EmbeddingInfo`; a file that cannot be used has ``error`` set (never raises
    for what the file holds)."""
    base: dict[str, Any] = {"name": name, "ref": ref, "path": path, "base_model": base_model}
    base["serial"] = next(_READS)
    try:
        size = path.stat().st_size
        if size == 0:
            raise EmbeddingFileError("empty file")
        if size > MAX_FILE_BYTES:
            raise EmbeddingFileError(f"{size} bytes: too large for an embedding (at most {MAX_FILE_BYTES})")
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            data = _load_image(path)
            named = data.get("name")
            base["name"] = named if isinstance(named, str) and named.strip() else name  # A1111's rule
        else:
            data = _load(path)
        parts = _parts(data)
    except EmbeddingFileError as exc:
        return EmbeddingInfo(**base, error=str(exc))
    except Exception as exc:  # a corrupt file of any kind: skipped, the service goes on
        return EmbeddingInfo(**base, error=f"unreadable: {type(exc).__name__}: {str(exc)[:200]}")
    first = next(iter(parts.values()))

    def meta(key: str, kind: type) -> Any:
        value = data.get(key)
        return value if isinstance(value, kind) and not isinstance(value, bool) else None

    return EmbeddingInfo(
        **base,
        parts=parts,
        vectors=int(first.shape[0]),
        shape=sum(int(t.shape[-1]) for t in parts.values()),
        step=meta("step", int),
        sd_checkpoint=meta("sd_checkpoint", str),
        sd_checkpoint_name=meta("sd_checkpoint_name", str),
    )


@dataclass(frozen=True)
class Catalog:
    """The embeddings of one model: usable ones by name, the others by name with the reason."""

    key: tuple[Any, ...]  # changes whenever a file the model sees changes (prompt cache keys)
    loaded: dict[str, EmbeddingInfo]
    skipped: dict[str, tuple[EmbeddingInfo, str]]

    def listing(self) -> dict[str, Any]:
        """``GET /sdapi/v1/embeddings``: A1111's ``{loaded: {name: {...}}, skipped: {...}}``."""
        return {
            "loaded": {n: e.describe() for n, e in self.loaded.items()},
            "skipped": {n: e.describe(reason) for n, (e, reason) in self.skipped.items()},
        }


class EmbeddingIndex:
    """Embedding files of the store, each read once (again when it changes)."""

    def __init__(self, root: Path, max_age_s: float = RESCAN_S) -> None:
        self.root, self.max_age_s = Path(root), float(max_age_s)
        self._read: dict[Path, tuple[tuple[int, int], EmbeddingInfo]] = {}
        self._last: tuple[float, list[EmbeddingInfo]] | None = None  # (when, what) of the last scan
        self._lock = threading.Lock()

    def folders(self) -> list[tuple[Path, str | None]]:
        out: list[tuple[Path, str | None]] = [(self.root / FOLDER, None)]
        if self.root.is_dir():
            out += [(d / FOLDER, d.name) for d in model_folders(self.root)]
        return out

    def files(self) -> Iterator[tuple[Path, str, str | None]]:
        """(path, reference, model folder or None) of every embedding file, at most MAX_FILES."""
        count = 0
        for folder, base in self.folders():
            if not folder.is_dir():
                continue
            for dirpath, dirnames, filenames in os.walk(folder):
                dirnames.sort()
                for fn in sorted(filenames):
                    path = Path(dirpath) / fn
                    if not _embedding_file(path):
                        continue
                    count += 1
                    if count > MAX_FILES:
                        return
                    yield path, path.relative_to(folder).with_suffix("").as_posix(), base

    def comfy_names(self) -> list[str]:
        """ComfyUI's ``GET /embeddings``: every file's path below its folder, without the extension
        (ComfyUI's own kinds: no embedding images)."""
        return sorted({ref for path, ref, _ in self.files() if path.suffix.lower() in EXTENSIONS})

    def comfy_files(self) -> list[str]:
        """ComfyUI's ``GET /models/embeddings``: the same with the extension (its file list)."""
        return sorted(
            {ref + path.suffix for path, ref, _ in self.files() if path.suffix.lower() in EXTENSIONS}
        )

    def refresh(self) -> None:
        """Read every file again on the next scan (A1111's refresh-embeddings)."""
        with self._lock:
            self._read.clear()
            self._last = None

    def scan(self, fresh: bool = False) -> list[EmbeddingInfo]:
        """Every file's info; the last scan's when it is younger than ``max_age_s`` (prompts: a folder
        of many files is walked at most that often) unless ``fresh``."""
        with self._lock:
            last = self._last
        if not fresh and last is not None and time.monotonic() - last[0] < self.max_age_s:
            return last[1]
        started = time.monotonic()
        seen, out = set(), []
        for path, ref, base in self.files():
            try:
                st = path.stat()
            except OSError:
                continue
            sig = (st.st_mtime_ns, st.st_size)
            seen.add(path)
            with self._lock:
                hit = self._read.get(path)
            if hit is None or hit[0] != sig:
                info = read_embedding(path, path.stem, ref, base)
                with self._lock:
                    self._read[path] = (sig, info)
            else:
                info = hit[1]
            out.append(info)
        with self._lock:
            for gone in set(self._read) - seen:
                del self._read[gone]
            self._last = (started, out)
        return out

    def catalog(self, model: str, widths: list[int], fresh: bool = False) -> Catalog:
        """What ``model`` (its text encoders' widths, in order) can use; the rest with the reason."""
        infos = [i for i in self.scan(fresh) if i.base_model in (None, model)]
        infos.sort(key=lambda i: i.base_model is None)  # the model's own folder first: its names win
        loaded: dict[str, EmbeddingInfo] = {}
        skipped: dict[str, tuple[EmbeddingInfo, str]] = {}
        for info in infos:
            reason = info.error or _misfit(info, widths)
            if reason is None and info.name in loaded:
                reason = f"name {info.name!r} is already used by {loaded[info.name].ref!r}"
            if reason is None:
                loaded[info.name] = info
            else:
                skipped[info.name if info.name not in skipped else info.ref] = (info, reason)
        key = tuple((str(i.path), i.serial) for i in infos)
        return Catalog(key, loaded, skipped)


def _misfit(info: EmbeddingInfo, widths: list[int]) -> str | None:
    """Why the file does not fit text encoders of these widths (None: it fits), as A1111 compares shapes."""
    if not widths:
        return "the model has no CLIP text encoder"
    want = "SDXL's clip_l + clip_g" if len(widths) == 2 else "one tensor"
    layout_ok = (len(info.parts) == 2) == (len(widths) == 2)
    if not layout_ok or info.widths() != widths:
        total = " + ".join(map(str, widths))
        return f"width {info.shape} does not fit this model (its text encoders take {total}: {want})"
    return None


@dataclass(frozen=True)
class EmbeddingSet:
    """A model's usable embeddings with each name's token ids per tokenizer (longest first per first id)."""

    catalog: Catalog
    lookup: list[dict[int, list[tuple[list[int], EmbeddingInfo]]]]

    @property
    def key(self) -> tuple[Any, ...]:
        return self.catalog.key

    def __bool__(self) -> bool:
        return bool(self.catalog.loaded)

    def match(self, tokens: list[int], position: int, encoder: int) -> tuple[EmbeddingInfo, int] | None:
        """The embedding whose name's tokens start at ``position`` (the longest), and their count."""
        for ids, info in self.lookup[encoder].get(tokens[position], ()):
            if tokens[position : position + len(ids)] == ids:
                return info, len(ids)
        return None

    def reference(self, word: str) -> EmbeddingInfo:
        """ComfyUI's ``embedding:<word>``: a name, or a path below the folder, with or without extension."""
        for ext in EXTENSIONS:
            if word.lower().endswith(ext):
                word = word[: -len(ext)]
                break
        hit = self.catalog.loaded.get(word)
        if hit is None:
            hit = next((i for i in self.catalog.loaded.values() if i.ref == word), None)
        if hit is None:
            skipped = self.catalog.skipped.get(word)
            why = f": {skipped[1]}" if skipped else ""
            raise EmbeddingError(
                f"embedding:{word} names no usable embedding{why}", sorted(self.catalog.loaded)
            )
        return hit

    @staticmethod
    def vectors(info: EmbeddingInfo, encoder: int) -> Tensor:
        """The vectors this embedding puts into text encoder ``encoder`` (SDXL: clip_l, then clip_g)."""
        return info.parts[""] if "" in info.parts else info.parts[SDXL_KEYS[encoder]]


def split_references(text: str, embeddings: EmbeddingSet) -> list[str | EmbeddingInfo]:
    """``text`` with ComfyUI's ``embedding:name`` words resolved (commas after the name stay text, as
    ComfyUI strips them); EmbeddingError for a name that is not usable."""
    out: list[str | EmbeddingInfo] = []
    last = 0
    for m in REFERENCE.finditer(text):
        word = m.group(1)
        try:
            info = embeddings.reference(word)
        except EmbeddingError:
            word = word.rstrip(",")
            if not word or word == m.group(1):
                raise
            info = embeddings.reference(word)
        out += [text[last : m.start()], info]
        last = m.start(1) + len(word)
    out.append(text[last:])
    return [p for p in out if not isinstance(p, str) or p]


class ModelEmbeddings:
    """One loaded model's embeddings: its catalog from the index, the names tokenized with its
    tokenizers; rebuilt when a file changes."""

    def __init__(self, model: str, index: EmbeddingIndex, widths: list[int], tokenizers: list[Any]) -> None:
        self.model, self.index, self.widths, self.tokenizers = model, index, widths, tokenizers
        self._current: EmbeddingSet | None = None
        self._lock = threading.Lock()

    def catalog(self, fresh: bool = False) -> Catalog:
        return self.index.catalog(self.model, self.widths, fresh)

    def current(self) -> EmbeddingSet:
        catalog = self.catalog()
        with self._lock:
            if self._current is not None and self._current.key == catalog.key:
                return self._current
        lookup: list[dict[int, list[tuple[list[int], EmbeddingInfo]]]] = []
        for tok in self.tokenizers:
            table: dict[int, list[tuple[list[int], EmbeddingInfo]]] = {}
            for name, info in catalog.loaded.items():
                ids = list(tok(name, add_special_tokens=False, truncation=False)["input_ids"])
                if ids:
                    table.setdefault(ids[0], []).append((ids, info))
            for matches in table.values():
                matches.sort(key=lambda m: len(m[0]), reverse=True)  # the longest name first (A1111)
            lookup.append(table)
        built = EmbeddingSet(catalog, lookup)
        with self._lock:
            self._current = built
        return built


def attach_embeddings(model: Any, index: EmbeddingIndex) -> ModelEmbeddings | None:
    """Embedding support for a loaded model whose prompt encoder reads them (Stable Diffusion 1/2/XL),
    set on its encoder; None for other models."""
    sd = getattr(model, "text_model", None)
    text = getattr(sd, "text", None)
    if text is None or not hasattr(text, "embeddings"):
        return None
    widths = [int(enc.get_input_embeddings().weight.shape[-1]) for enc in text.encoders]
    text.embeddings = ModelEmbeddings(model.name, index, widths, text.tokenizers)
    return text.embeddings  # type: ignore[no-any-return]


def embedding_catalog(model: Any, index: EmbeddingIndex) -> Catalog:
    """A loaded model's catalog (a model without CLIP text encoders: every file skipped, saying so)."""
    text = getattr(getattr(model, "text_model", None), "text", None)
    own: ModelEmbeddings | None = getattr(text, "embeddings", None)
    return own.catalog(fresh=True) if own is not None else index.catalog(model.name, [], fresh=True)

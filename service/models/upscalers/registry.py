"""The upscalers a request may name: the plain resizes and every model file in ``model_store/upscalers/``.

:meth:`Upscalers.upscale` is the one entry point (the extras routes, ``POST /upscale`` and the hires fix
use it). It blocks: call it from a worker thread. Model files load on first use (one load per file,
shared by concurrent callers), each loaded model gets a batcher thread, and at most ``max_loaded``
stay loaded (least recently used dropped first). A file that cannot be used fails the requests that
name it with :class:`UpscalerLoadError`, naming the file; the error is remembered until the file changes.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import torch
from torch import Tensor

from service.models.file_names import listing
from service.sampling.errors import InputError

from .batcher import Batcher, BatchStats
from .nets import Net
from .resize import LANCZOS, NEAREST, pil_resize
from .tiles import upscale_tiled
from .weights import EXTENSIONS, FileError, NonCommercial, load_net

T = TypeVar("T")
PLAIN_UPSCALERS = ("None", "Lanczos", "Nearest")
REQUEST_THREADS = 8  # upscale requests waiting on their tiles at once (their own pool: see call())
MAX_PASSES = 3  # A1111's loop: a model pass repeats until the image covers the target, 3 times at most


class UnknownUpscaler(InputError):
    """A name that is neither a plain resize nor a file in the upscalers folder."""


class UpscalerLoadError(InputError):
    """The named file cannot be used (unreadable, unknown architecture, non-commercial licence)."""


@dataclass(frozen=True)
class UpscalerInfo:
    name: str
    path: Path | None
    family: str | None  # A1111's upscaler class name ("ESRGAN", "RealESRGAN"); None for plain resizes
    scale: float | None  # the model's own scale (None: not known, e.g. the file is unreadable)


@dataclass
class UpscalerConfig:
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    tile: int = 256
    overlap: int = 16
    batch: int = 4
    allow_noncommercial: bool = False
    max_pixels: int = 8192 * 4096
    max_loaded: int = 4

    @classmethod
    def of(cls, s: UpscalerSettings, device: str, dtype: torch.dtype) -> UpscalerConfig:
        """The service's KDIFF_UPSCALER_* settings, on the models' device and dtype."""
        return cls(
            device, dtype, s.upscaler_tile, s.upscaler_tile_overlap, s.upscaler_batch,
            s.upscaler_noncommercial, s.upscale_max_pixels,
        )  # fmt: skip


class UpscalerSettings(Protocol):
    upscaler_tile: int
    upscaler_tile_overlap: int
    upscaler_batch: int
    upscaler_noncommercial: bool
    upscale_max_pixels: int


@dataclass
class _Loaded:
    net: Net
    batcher: Batcher
    stamp: tuple[float, int]


class Upscalers:
    def __init__(self, folder: Path, config: UpscalerConfig | None = None) -> None:
        self.folder = folder
        self.config = config or UpscalerConfig()
        self._lock = threading.Lock()
        self._load_locks: dict[str, threading.Lock] = {}
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()
        self._failed: dict[str, tuple[tuple[float, int], str]] = {}
        self._meta: dict[str, tuple[tuple[float, int], str | None, float | None]] = {}
        self._requests = ThreadPoolExecutor(REQUEST_THREADS, thread_name_prefix="upscale-request")

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run a blocking upscale step (decode, upscale, encode) off the event loop, in the upscalers'
        own threads: a long upscale must not hold the loop's default executor, which model loading,
        PNG encoding and the other routes share (it has only cpu_count + 4 threads)."""
        return await asyncio.get_running_loop().run_in_executor(self._requests, fn, *args)

    def configure(self, config: UpscalerConfig) -> None:
        """New settings (the app's, at start); loaded models are dropped so they reload with them."""
        with self._lock:
            self.config = config
            for entry in self._loaded.values():
                entry.batcher.close()
            self._loaded.clear()

    # --- what there is ---
    def files(self) -> dict[str, Path]:
        """Name (file stem) -> file; for one stem in several formats, .safetensors first."""
        if not self.folder.is_dir():
            return {}
        found: dict[str, Path] = {}
        for path in sorted(
            listing(self.folder),
            key=lambda p: (EXTENSIONS.index(p.suffix) if p.suffix in EXTENSIONS else 99, p.name),
        ):
            if path.suffix in EXTENSIONS and path.is_file() and path.stem not in PLAIN_UPSCALERS:
                found.setdefault(path.stem, path)
        return dict(sorted(found.items(), key=lambda kv: kv[0].lower()))

    def names(self) -> list[str]:
        return [*PLAIN_UPSCALERS, *self.files()]

    def items(self) -> list[UpscalerInfo]:
        """Every upscaler with its scale: read from the file's keys once per file version (reads the
        file: call it from a worker thread)."""
        out = [UpscalerInfo(name, None, None, 4.0) for name in PLAIN_UPSCALERS]
        for name, path in self.files().items():
            family, scale = self._describe(name, path)
            out.append(UpscalerInfo(name, path, family, scale))
        return out

    def _describe(self, name: str, path: Path) -> tuple[str | None, float | None]:
        stamp = _stamp(path)
        with self._lock:
            entry = self._loaded.get(name)
            if entry is not None and entry.stamp == stamp:
                return entry.net.family, float(entry.net.scale)
            meta = self._meta.get(name)
        if meta is not None and meta[0] == stamp:
            return meta[1], meta[2]
        try:
            net = load_net(path, self.config.allow_noncommercial)
            family, scale = net.family, float(net.scale)
        except FileError:
            family, scale = None, None
        with self._lock:
            self._meta[name] = (stamp, family, scale)
        return family, scale

    # --- upscaling ---
    def upscale(
        self,
        images: Tensor,
        name: str,
        *,
        size: tuple[int, int] | None = None,
        scale: float | None = None,
        field: str = "upscaler",
    ) -> Tensor:
        """[B, 3, H, W] in 0..1 -> the upscaled images (float32 in 0..1, on the input's device).

        ``scale``: A1111's ``Upscaler.upscale`` (target ``int(H * scale // 8 * 8)`` by
        ``int(W * scale // 8 * 8)``: model passes until the image covers it, then Lanczos to it);
        ``size`` = (h, w): A1111's ``resize_image`` for the hires fix (``None`` = Lanczos straight to
        the size; otherwise the same passes for ``max(h / H, w / W)`` when above 1, then Lanczos to
        exactly ``size``). Blocking: call from a worker thread."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(field, f"expected images [B, 3, H, W]; got {tuple(images.shape)}")
        if (size is None) == (scale is None):
            raise InputError(field, "give exactly one of size or scale")
        step = self._step(name, field)
        x = images.float()
        h, w = x.shape[-2:]
        if size is not None:
            self._check_size(size, field)
            if name == "None":
                return pil_resize(x, size, LANCZOS).clamp_(0, 1)
            ratio = max(size[0] / h, size[1] / w)
            if ratio > 1.0:
                x = self._passes(x, ratio, step, field)
            return pil_resize(x, size, LANCZOS).clamp_(0, 1)
        assert scale is not None
        if not (math.isfinite(scale) and scale > 0):
            raise InputError(field, f"scale must be a positive number; got {scale}")
        return self._passes(x, scale, step, field).clamp_(0, 1)

    def _passes(self, x: Tensor, scale: float, step: _Step, field: str) -> Tensor:
        h, w = x.shape[-2:]
        dest = (int((h * scale) // 8 * 8), int((w * scale) // 8 * 8))
        self._check_size(dest, field)
        # Sizes of the passes first: a pass that overshoots (a 4x model twice for 4.5x) must fit too.
        cur = (h, w)
        for _ in range(MAX_PASSES):
            nxt = step.size(cur, scale)
            if nxt == cur:
                break
            self._check_size(nxt, field, "an intermediate pass")
            cur = nxt
            if cur[0] >= dest[0] and cur[1] >= dest[1]:
                break
        for _ in range(MAX_PASSES):
            before = tuple(x.shape[-2:])
            x = step.run(x, scale)
            if tuple(x.shape[-2:]) == before or (x.shape[-2] >= dest[0] and x.shape[-1] >= dest[1]):
                break
        return pil_resize(x, dest, LANCZOS)

    def _check_size(self, size: tuple[int, int], field: str, what: str = "the target") -> None:
        h, w = size
        limit = self.config.max_pixels
        if h < 1 or w < 1:
            raise InputError(field, f"{what} size {w}x{h} is empty", [1, limit])
        if h * w > limit:
            raise InputError(
                field,
                f"{what} size {w}x{h} is {h * w} pixels; at most {limit} (KDIFF_UPSCALE_MAX_PIXELS)",
                [1, limit],
            )

    def _step(self, name: str, field: str) -> _Step:
        if name == "None":
            return _Step(lambda x, s: x, lambda hw, s: hw)
        if name in ("Lanczos", "Nearest"):
            kind = LANCZOS if name == "Lanczos" else NEAREST
            return _Step(lambda x, s: pil_resize(x, _times(x.shape[-2:], s), kind), _times)
        path = self.files().get(name)
        if path is None:
            raise UnknownUpscaler(
                field, f"unknown upscaler {name!r}; available: {', '.join(self.names())}", self.names()
            )
        entry = self._entry(name, path, field)
        cfg = self.config
        k = entry.net.scale

        def run(x: Tensor, s: float) -> Tensor:
            return upscale_tiled(
                x, k, entry.batcher.submit, cfg.tile, cfg.overlap, entry.net.align, in_flight=2 * cfg.batch
            )

        return _Step(run, lambda hw, s: (hw[0] * k, hw[1] * k))

    def _entry(self, name: str, path: Path, field: str) -> _Loaded:
        stamp = _stamp(path)
        with self._lock:
            lock = self._load_locks.setdefault(name, threading.Lock())
        with lock:  # one load per file; concurrent requests for it wait for that one
            with self._lock:
                entry = self._loaded.get(name)
                if entry is not None and entry.stamp == stamp:
                    self._loaded.move_to_end(name)
                    return entry
                failed = self._failed.get(name)
            if failed is not None and failed[0] == stamp:
                raise UpscalerLoadError(field, failed[1], self.names())
            cfg = self.config
            try:
                net = load_net(path, cfg.allow_noncommercial)
                half = cfg.dtype == torch.float16 and not net.supports_half
                net = net.to(cfg.device, torch.float32 if half else cfg.dtype)
            except FileError as exc:
                kind = "refused" if isinstance(exc, NonCommercial) else "cannot be used"
                message = f"upscaler {name!r} ({path.name}) {kind}: {exc}"
                self._failed[name] = (stamp, message)
                raise UpscalerLoadError(field, message, self.names()) from exc
            entry = _Loaded(net, Batcher(net, torch.device(cfg.device), cfg.batch, name), stamp)
            with self._lock:
                old = self._loaded.pop(name, None)
                if old is not None:
                    old.batcher.close()
                self._loaded[name] = entry
                while len(self._loaded) > max(1, cfg.max_loaded):
                    self._loaded.popitem(last=False)[1].batcher.close()
            return entry

    def stats(self, name: str) -> BatchStats | None:
        with self._lock:
            entry = self._loaded.get(name)
        return entry.batcher.stats if entry is not None else None

    def close(self) -> None:
        with self._lock:
            for entry in self._loaded.values():
                entry.batcher.close()
            self._loaded.clear()


@dataclass(frozen=True)
class _Step:
    """One upscaler pass (A1111's ``do_upscale``) and the size it gives."""

    run: Callable[[Tensor, float], Tensor]
    size: Callable[[tuple[int, int], float], tuple[int, int]]


def _times(hw: tuple[int, int] | torch.Size, s: float) -> tuple[int, int]:
    return int(hw[0] * s), int(hw[1] * s)


def _stamp(path: Path) -> tuple[float, int]:
    try:
        st = path.stat()
    except OSError:
        return (0.0, -1)
    return (st.st_mtime, st.st_size)

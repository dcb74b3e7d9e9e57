"""The process cache of loaded annotator networks (Depth Anything, the OpenPose body / hand / face
networks), shared by every model-based preprocessor.

- Per file: an entry is named by its files' resolved paths (and the device it sits on) and is
  valid while each file's ``mtime_ns`` and size are the ones it was loaded from; a replaced file
  loads anew and the stale network is let go (a missing file counts as a state of its own, so a
  ``preprocessor_config.json`` added later also reloads).
- Bounded: at most ``limit`` networks; the least recently used goes first.
- Thread-safe: requests run preprocessors in worker threads; two that need the same file while
  it is not loaded wait for one load instead of loading it twice. Different files load at once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

# depth (1) + body, hand, face (3) on the device, with room for a second device or a replaced file
LIMIT = 8

Device = torch.device | str | None  # where a network runs (None: the CPU)
Stamp = tuple[tuple[int, int] | None, ...]
Key = tuple[tuple[Path, ...], str]


def stamp(paths: Sequence[Path]) -> Stamp:
    """Each file's (mtime_ns, size), None where it is missing."""
    out: list[tuple[int, int] | None] = []
    for p in paths:
        try:
            st = p.stat()
        except FileNotFoundError:
            out.append(None)
            continue
        out.append((st.st_mtime_ns, st.st_size))
    return tuple(out)


class NetworkCache:
    """Loaded networks by (files, device), reloaded when a file changes, least recently used dropped."""

    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = max(1, int(limit))
        self._lock = threading.Lock()  # guards the two dicts, never held while loading
        self._entries: OrderedDict[Key, tuple[Stamp, Any]] = OrderedDict()
        # one load at a time per key; kept (a lock per path ever used) so that no two gates for
        # one key can exist at once
        self._gates: dict[Key, threading.Lock] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _hit(self, key: Key, now: Stamp) -> tuple[bool, Any]:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] != now:
                return False, None
            self._entries.move_to_end(key)
            return True, entry[1]

    def get(self, paths: Sequence[Path], load: Callable[[], Any], device: str = "cpu") -> Any:
        """The network loaded from ``paths`` for ``device``; ``load`` runs only when the files are
        not loaded as they are now (its exception leaves nothing cached)."""
        key: Key = (tuple(Path(p).resolve() for p in paths), device)
        now = stamp(key[0])
        found, net = self._hit(key, now)
        if found:
            return net
        with self._lock:
            gate = self._gates.setdefault(key, threading.Lock())
        with gate:
            found, net = self._hit(key, now)  # another request loaded it while this one waited
            if found:
                return net
            with self._lock:  # a stale network goes before the new one loads (its memory too)
                self._entries.pop(key, None)
            net = load()
            with self._lock:
                self._entries[key] = (now, net)
                self._entries.move_to_end(key)
                while len(self._entries) > self.limit:
                    self._entries.popitem(last=False)
            return net

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


NETWORKS = NetworkCache()

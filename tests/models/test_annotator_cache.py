"""The annotator network cache (service/models/controlnet/annotator_cache.py) that Depth Anything and
the OpenPose networks load through: per file version (a replaced file reloads), bounded (least
recently used dropped), one load for concurrent requests of one file, loads of different files at
the same time; and the pose networks placed on the device they are asked for (float32), left as
loaded where that device is the CPU."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from service.models.controlnet import openpose
from service.models.controlnet.annotator_cache import NETWORKS, NetworkCache


class Loads:
    """A loader that counts its calls per file and returns the file's bytes and the call's number."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls: dict[str, int] = {}
        self.delay = delay
        self._lock = threading.Lock()

    def __call__(self, path: Path) -> Any:
        with self._lock:
            self.calls[path.name] = self.calls.get(path.name, 0) + 1
            n = self.calls[path.name]
        time.sleep(self.delay)
        return (path.read_bytes(), n)


def _file(folder: Path, name: str, data: bytes = b"v1") -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def test_a_replaced_file_reloads_and_the_old_network_goes(tmp_path: Path) -> None:
    cache, loads = NetworkCache(), Loads()
    path = _file(tmp_path, "body_pose_model.pth")
    first = cache.get([path], lambda: loads(path))
    assert cache.get([path], lambda: loads(path)) is first and loads.calls == {path.name: 1}
    # replaced as a download tool does: a new file renamed over the old one
    _file(tmp_path, "new.part", b"version 2")
    os.replace(tmp_path / "new.part", path)
    assert cache.get([path], lambda: loads(path)) == (b"version 2", 2)
    assert len(cache) == 1  # the stale network is let go
    # same size, only the modification time moved: still a new version
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert cache.get([path], lambda: loads(path)) == (b"version 2", 3)
    # a symlink to the file is the same network
    (tmp_path / "link.pth").symlink_to(path)
    assert cache.get([tmp_path / "link.pth"], lambda: loads(path)) == (b"version 2", 3)


def test_a_file_of_a_group_added_later_reloads(tmp_path: Path) -> None:
    """Depth Anything's folder: preprocessor_config.json appearing (or changing) loads anew."""
    cache, loads = NetworkCache(), Loads()
    model = _file(tmp_path, "model.safetensors")
    files = [model, tmp_path / "preprocessor_config.json"]
    cache.get(files, lambda: loads(model))
    cache.get(files, lambda: loads(model))
    _file(tmp_path, "preprocessor_config.json", b"{}")
    cache.get(files, lambda: loads(model))
    assert loads.calls == {model.name: 2} and len(cache) == 1


def test_concurrent_requests_of_one_file_load_it_once(tmp_path: Path) -> None:
    cache, loads = NetworkCache(), Loads(delay=0.2)
    path = _file(tmp_path, "hand_pose_model.pth")
    start = threading.Barrier(8)
    got: list[Any] = []

    def request() -> None:
        start.wait()
        got.append(cache.get([path], lambda: loads(path)))

    threads = [threading.Thread(target=request) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert loads.calls == {path.name: 1} and len(got) == 8 and all(g is got[0] for g in got)


def test_different_files_load_at_the_same_time(tmp_path: Path) -> None:
    """Two files' loads overlap (a long load of one does not hold up the other)."""
    cache = NetworkCache()
    a, b = _file(tmp_path, "a.pth"), _file(tmp_path, "b.pth")
    b_loading = threading.Event()

    def load_a() -> str:
        assert b_loading.wait(5), "the second file's load waited for the first's"
        return "a"

    def load_b() -> str:
        b_loading.set()
        return "b"

    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(cache.get([a], load_a)))
    t.start()
    time.sleep(0.05)  # a's load is under way
    out.append(cache.get([b], load_b))
    t.join(10)
    assert sorted(out) == ["a", "b"]


def test_the_bound_holds_least_recently_used_first(tmp_path: Path) -> None:
    cache, loads = NetworkCache(limit=3), Loads()
    paths = [_file(tmp_path, f"{n}.pth") for n in "abcde"]
    a, b, c, d, e = paths

    def get(p: Path) -> Any:
        return cache.get([p], lambda: loads(p))

    for p in (a, b, c):
        get(p)
    get(a)  # a used again: b is now the least recently used
    get(d)
    assert len(cache) == 3
    get(a), get(c), get(d)  # still held: no new loads
    assert loads.calls == {"a.pth": 1, "b.pth": 1, "c.pth": 1, "d.pth": 1}
    get(b)  # was dropped: loads again (and drops a, the least recent now)
    get(e)
    assert loads.calls["b.pth"] == 2 and len(cache) == 3
    for p in paths:  # over many files the cache never holds more than its limit
        get(p)
        assert len(cache) <= 3


def test_a_failed_load_leaves_nothing_and_is_tried_again(tmp_path: Path) -> None:
    cache = NetworkCache()
    path = _file(tmp_path, "facenet.pth")

    def broken() -> Any:
        raise ValueError("not a weight file")

    with pytest.raises(ValueError):
        cache.get([path], broken)
    assert len(cache) == 0 and cache.get([path], lambda: "net") == "net"


def _tiny(path: Path) -> torch.nn.Module:
    """Stands in for a pose network's loader (a float64 one: a dtype change would show)."""
    return torch.nn.Linear(2, 2).double()


def test_pose_networks_go_to_the_device_in_float32_and_stay_as_loaded_on_the_cpu(tmp_path: Path) -> None:
    path = _file(tmp_path, "body_pose_model.pth")
    NETWORKS.clear()
    try:
        on_cpu = openpose._net(path, _tiny, None)
        # a CPU device given, as a string or a torch.device: the very network loaded, unchanged
        assert openpose._net(path, _tiny, "cpu") is on_cpu
        assert openpose._net(path, _tiny, torch.device("cpu")) is on_cpu
        assert next(on_cpu.parameters()).dtype == torch.float64
        # another device (meta stands in for CUDA here): its own copy there, in float32
        elsewhere = openpose._net(path, _tiny, torch.device("meta"))
        p = next(elsewhere.parameters())
        assert p.device.type == "meta" and p.dtype == torch.float32
        assert openpose._net(path, _tiny, "meta") is elsewhere
        assert next(on_cpu.parameters()).device.type == "cpu"  # the CPU one is not moved
    finally:
        NETWORKS.clear()

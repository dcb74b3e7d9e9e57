"""Model lifecycle policy: the memory budget, what a model weighs, which idle models to evict."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch


class ModelUnavailable(Exception):
    """A model that cannot be served now: ``status`` is its HTTP status, ``code`` the job error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class ModelBusy(ModelUnavailable):
    def __init__(self, name: str) -> None:
        super().__init__(409, "busy", f"model {name!r} has queued or running jobs; unload it when idle")


def device_bytes(device: str) -> int:
    """What the device has: a GPU's total memory, or the machine's RAM for the CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.get_device_properties(dev).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB ({n} bytes)"


@dataclass
class Footprint:
    """Models' memory: the bytes each loaded one holds, and when each was last used."""

    budget: int
    used_at: dict[str, float]
    weight: dict[str, int]

    def plan_evictions(
        self, name: str, need: int, idle: Callable[[str], bool], loaded: Iterable[str]
    ) -> list[str]:
        """The idle models to unload (least recently used first) so that ``need`` more bytes fit;
        raises ModelUnavailable (507: never fits, 503: the room is held by busy models)."""
        if need > self.budget:
            raise ModelUnavailable(
                507,
                "insufficient_memory",
                f"model {name!r} needs about {fmt_bytes(need)}, more than the memory budget of "
                f"{fmt_bytes(self.budget)} (KDIFF_MEMORY_BUDGET)",
            )
        others = [m for m in loaded if m != name]
        used = sum(self.weight.get(m, 0) for m in others)
        out: list[str] = []
        for m in sorted((m for m in others if idle(m)), key=lambda m: self.used_at.get(m, 0.0)):
            if used + need <= self.budget:
                break
            out.append(m)
            used -= self.weight.get(m, 0)
        if used + need > self.budget:
            raise ModelUnavailable(
                503,
                "insufficient_memory",
                f"model {name!r} needs about {fmt_bytes(need)}; the memory budget of "
                f"{fmt_bytes(self.budget)} (KDIFF_MEMORY_BUDGET) is held by models with "
                "running jobs; retry later",
            )
        return out

"""An in-memory :class:`~service.comfy.runtime.ComfyContext` (tests; the HTTP side's unit tests too)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class MemoryContext:
    """Stores images in dicts and records every event."""

    owner: str | None = None
    previews: bool = False
    files: dict[tuple[str, str, str], bytes] = field(default_factory=dict)  # (type, subfolder, name)
    events: list[tuple[str, Any]] = field(default_factory=list)
    cancel: bool = False
    counter: int = 0

    def save_image(self, png: bytes, filename_prefix: str, type: str) -> dict[str, str]:
        self.counter += 1
        sub, _, prefix = filename_prefix.replace("\\", "/").rpartition("/")
        name = f"{prefix}_{self.counter:05d}_.png"
        self.files[(type, sub, name)] = png
        return {"filename": name, "subfolder": sub, "type": type}

    def load_image(self, name: str, subfolder: str, type: str) -> bytes:
        try:
            return self.files[(type, subfolder, name)]
        except KeyError:
            raise FileNotFoundError(name) from None

    def list_inputs(self) -> list[str]:
        return sorted(f"{sub}/{name}" if sub else name for (kind, sub, name) in self.files if kind == "input")

    def on_event(self, kind: str, data: dict[str, Any] | bytes) -> None:
        self.events.append((kind, data))

    def cancelled(self) -> bool:
        return self.cancel

    def kinds(self) -> list[str]:
        return [k for k, _ in self.events]

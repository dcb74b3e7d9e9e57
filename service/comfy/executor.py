"""Running a validated workflow: nodes in dependency order for the output nodes, ComfyUI's events
(``execution_start``, ``execution_cached``, ``executing``, ``progress``, ``executed``,
``execution_success`` | ``execution_error`` | ``execution_interrupted``), and the output cache.

The cache keys a node by its class, its values and the keys of the nodes it reads (and the caller):
a re-queued prompt with one changed seed finds every node upstream of that sampler cached and
re-runs the sampler and what follows, as ComfyUI's cache does. Bounded by entries and by the bytes
of the tensors it holds, least recently used first.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL import Image
from torch import Tensor

from service.sampling.errors import InputError

from .node import Node
from .runtime import ComfyContext, Interrupted, NodeRun
from .validate import Validation

if TYPE_CHECKING:
    from service.serving.service import Service

MAX_CACHE_ENTRIES = 256
MAX_CACHE_BYTES = 256 << 20  # the tensors (IMAGE batches) the cache may hold


@dataclass
class RunResult:
    """How a prompt ended, in the terms of ComfyUI's history entry."""

    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # node id -> {"images": [...]}
    status_str: str = "success"  # "success" | "error"
    completed: bool = True
    messages: list[list[Any]] = field(default_factory=list)  # [[event, data], ...]
    cached: list[str] = field(default_factory=list)
    executed: list[str] = field(default_factory=list)
    interrupted: bool = False
    error: dict[str, Any] | None = None  # the execution_error data


def _nbytes(value: Any) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Image.Image):  # an IPAdapter unit's reference image (GatedImage.image)
        return value.width * value.height * len(value.getbands())
    if isinstance(value, tuple | list):
        return sum(_nbytes(v) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return sum(_nbytes(getattr(value, f)) for f in value.__dataclass_fields__)
    return 0


class OutputCache:
    """Node outputs by key, least recently used first out."""

    def __init__(self, max_entries: int = MAX_CACHE_ENTRIES, max_bytes: int = MAX_CACHE_BYTES) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._items: OrderedDict[str, tuple[tuple[Any, ...], dict[str, Any] | None, int]] = OrderedDict()
        self.bytes = 0

    def get(self, key: str) -> tuple[tuple[Any, ...], dict[str, Any] | None] | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0], item[1]

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def put(self, key: str, result: tuple[Any, ...], ui: dict[str, Any] | None) -> None:
        size = _nbytes(result)
        if size > self.max_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old[2]
        self._items[key] = (result, ui, size)
        self.bytes += size
        while len(self._items) > self.max_entries or self.bytes > self.max_bytes:
            _, (_, _, dropped) = self._items.popitem(last=False)
            self.bytes -= dropped

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0


def order(graph: dict[str, Any], outputs: list[str]) -> list[str]:
    """The nodes the outputs need, each after the nodes it reads (validation ruled out cycles)."""
    seen: set[str] = set()
    out: list[str] = []

    def visit(node_id: str) -> None:
        if node_id in seen:
            return
        seen.add(node_id)
        for value in graph[node_id]["inputs"].values():
            if isinstance(value, list):
                visit(value[0])
        out.append(node_id)

    for o in outputs:
        visit(o)
    return out


def cache_keys(
    graph: dict[str, Any], nodes: dict[str, type[Node]], owner: str | None, ids: list[str]
) -> dict[str, str]:
    """Each node's key: its class, values and upstream keys (a node that must always run, e.g.
    LoadImage whose file may change under its name, gets a fresh key, and so does what follows)."""
    keys: dict[str, str] = {}
    for node_id in ids:
        entry = graph[node_id]
        cls = nodes[entry["class_type"]]
        if not cls.CACHEABLE:
            keys[node_id] = secrets.token_hex(16)
            continue
        inputs = {
            k: ["link", keys[v[0]], v[1]] if isinstance(v, list) else v
            for k, v in sorted(entry["inputs"].items())
        }
        blob = json.dumps([owner, entry["class_type"], inputs], sort_keys=True, default=str)
        keys[node_id] = hashlib.sha256(blob.encode()).hexdigest()
    return keys


class Run:
    """One prompt's execution."""

    def __init__(
        self,
        service: Service,
        nodes: dict[str, type[Node]],
        cache: OutputCache,
        prompt_id: str,
        ctx: ComfyContext,
        original: dict[str, Any],
    ) -> None:
        self.service, self.nodes, self.cache = service, nodes, cache
        self.prompt_id, self.ctx, self.original = prompt_id, ctx, original
        self.result = RunResult()

    def emit(self, kind: str, data: dict[str, Any], record: bool = False) -> None:
        data = {**data, "prompt_id": self.prompt_id}
        if record:
            data["timestamp"] = int(time.time() * 1000)
            self.result.messages.append([kind, data])
        self.ctx.on_event(kind, data)

    def fail(self, kind: str, data: dict[str, Any]) -> RunResult:
        r = self.result
        r.status_str, r.completed = "error", False
        r.interrupted = kind == "execution_interrupted"
        self.emit(kind, data, record=True)
        if kind == "execution_error":
            r.error = r.messages[-1][1]
        return r

    async def execute(self, v: Validation) -> RunResult:
        self.emit("execution_start", {}, record=True)
        if not v.ok:
            error = v.error or {}
            why = f"{error.get('message', 'invalid prompt')}: {error.get('details', '')}".rstrip(": ")
            for node_id, entry in v.node_errors.items():
                for e in entry["errors"]:
                    why += f"; node {node_id} ({entry['class_type']}): {e['message']}: {e['details']}"
            return self.fail(
                "execution_error",
                {
                    "node_id": None,
                    "node_type": None,
                    "executed": [],
                    "exception_message": why,
                    "exception_type": "prompt_validation_failed",
                    "traceback": [],
                    "current_inputs": {},
                    "current_outputs": {},
                },
            )
        graph = v.prompt
        ids = order(graph, v.outputs)
        keys = cache_keys(graph, self.nodes, self.ctx.owner, ids)
        self.result.cached = [n for n in ids if keys[n] in self.cache]
        self.emit("execution_cached", {"nodes": self.result.cached}, record=True)
        values: dict[str, tuple[Any, ...]] = {}
        for node_id in ids:
            class_type = graph[node_id]["class_type"]
            hit = self.cache.get(keys[node_id])
            if hit is not None:
                values[node_id], ui = hit
                if ui is not None:
                    self.result.outputs[node_id] = ui
                    self.emit("executed", {"node": node_id, "display_node": node_id, "output": ui})
                continue
            if self.ctx.cancelled():
                return self._interrupted(node_id, class_type)
            self.emit("executing", {"node": node_id, "display_node": node_id})
            inputs = {
                k: values[v[0]][v[1]] if isinstance(v, list) else v
                for k, v in graph[node_id]["inputs"].items()
            }
            rt = NodeRun(self.service, self.ctx, self.prompt_id, node_id, self.original)
            try:
                out = await self.nodes[class_type]().run(rt, **inputs)
            except Interrupted:
                return self._interrupted(node_id, class_type)
            except Exception as exc:  # any failure: this prompt's execution_error, never an escape
                return self._error(node_id, class_type, exc, inputs)
            result, ui = (
                (tuple(out.get("result", ())), out.get("ui")) if isinstance(out, dict) else (out, None)
            )
            values[node_id] = result
            self.cache.put(keys[node_id], result, ui)
            self.result.executed.append(node_id)
            if ui is not None:
                self.result.outputs[node_id] = ui
                self.emit("executed", {"node": node_id, "display_node": node_id, "output": ui})
        self.emit("execution_success", {}, record=True)
        return self.result

    def _interrupted(self, node_id: str, class_type: str) -> RunResult:
        data = {"node_id": node_id, "node_type": class_type, "executed": list(self.result.executed)}
        return self.fail("execution_interrupted", data)

    def _error(self, node_id: str, class_type: str, exc: Exception, inputs: dict[str, Any]) -> RunResult:
        message = f"{exc.field}: {exc.message}" if isinstance(exc, InputError) else str(exc)
        kind = type(exc)
        data = {
            "node_id": node_id,
            "node_type": class_type,
            "executed": list(self.result.executed),
            "exception_message": message,
            "exception_type": kind.__qualname__
            if kind.__module__ == "builtins"
            else f"{kind.__module__}.{kind.__qualname__}",
            "traceback": [] if isinstance(exc, InputError) else traceback.format_tb(exc.__traceback__)[-5:],
            "current_inputs": {k: [_fmt(v)] for k, v in inputs.items()},
            "current_outputs": {},
        }
        return self.fail("execution_error", data)


def _fmt(value: Any) -> Any:
    """ComfyUI's format_value: plain values as they are, anything else as a (short) string."""
    if value is None or isinstance(value, int | float | bool):
        return value
    text = value if isinstance(value, str) else type(value).__name__
    return text if len(text) <= 200 else text[:200] + "..."

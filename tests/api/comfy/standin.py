"""A stand-in for ``service.comfy.Comfy`` with the interface comfy-core published
(/work/wt/comfy-interface.md): validate, run (events through the context, images stored through
it, cancellation polled), object_info, models. It lets the HTTP half's own behaviour (ordering,
isolation, files, sockets) be tested with timing under the test's control; the live-server tests
in tests/e2e/ run the real executor."""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

OUTPUT_NODES = {"SaveImage": "output", "PreviewImage": "temp"}
KNOWN = {"KSampler", "CheckpointLoaderSimple", "EmptyLatentImage", "CLIPTextEncode", "VAEDecode", "LoadImage"}
KNOWN |= set(OUTPUT_NODES)


@dataclass
class Validation:
    ok: bool
    outputs: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None
    node_errors: dict[str, Any] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "node_errors": self.node_errors}


@dataclass
class Result:
    outputs: dict[str, Any]
    status_str: str
    completed: bool
    messages: list[list[Any]]
    cached: list[str] = field(default_factory=list)
    interrupted: bool = False


def _error(kind: str, message: str, details: str = "") -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": {}}


def png(value: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value % 256, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


class StandInComfy:
    def __init__(self, step_s: float = 0.01, steps: int = 3) -> None:
        self.step_s, self.steps = step_s, steps
        self.runs = 0

    def validate(self, prompt: Any, ctx: Any = None) -> Validation:
        if not isinstance(prompt, dict):
            return Validation(
                False, error=_error("invalid_prompt", "Cannot execute because the prompt is not a dict")
            )
        node_errors: dict[str, Any] = {}
        for node_id, node in prompt.items():
            kind = node.get("class_type") if isinstance(node, dict) else None
            if kind not in KNOWN:
                err = _error("invalid_prompt", f"Cannot execute because node {kind} does not exist.")
                return Validation(False, error=err)
            batch = node.get("inputs", {}).get("batch_size", 1)
            if not isinstance(batch, int) or not 1 <= batch <= 16:
                e = _error("value_bigger_than_max", "Value bigger than max", f"batch_size: {batch}")
                node_errors[node_id] = {"errors": [e], "dependent_outputs": [], "class_type": kind}
        outputs = [n for n, v in prompt.items() if v["class_type"] in OUTPUT_NODES]
        if node_errors:
            err = _error("prompt_outputs_failed_validation", "Prompt outputs failed validation")
            return Validation(False, outputs, err, node_errors)
        if not outputs:
            return Validation(False, error=_error("prompt_no_outputs", "Prompt has no outputs"))
        return Validation(True, outputs)

    async def run(self, prompt: dict[str, Any], prompt_id: str, ctx: Any) -> Result:
        self.runs += 1
        stamp = {"prompt_id": prompt_id, "timestamp": int(time.time() * 1000)}
        messages: list[list[Any]] = [["execution_start", stamp]]
        ctx.on_event("execution_start", stamp)
        outputs: dict[str, Any] = {}
        for node_id, node in prompt.items():
            ctx.on_event("executing", {"node": node_id, "display_node": node_id, "prompt_id": prompt_id})
            if node["class_type"] == "LoadImage":
                try:
                    ctx.load_image(node["inputs"]["image"], "", "input")
                except (FileNotFoundError, ValueError) as exc:
                    error = {"prompt_id": prompt_id, "node_id": node_id, "exception_message": str(exc)}
                    ctx.on_event("execution_error", error)
                    return Result({}, "error", False, [*messages, ["execution_error", error]])
            if node["class_type"] == "KSampler":
                for step in range(self.steps):
                    if ctx.cancelled():
                        info = {
                            "prompt_id": prompt_id,
                            "node_id": node_id,
                            "node_type": "KSampler",
                            "executed": [],
                        }
                        ctx.on_event("execution_interrupted", info)
                        return Result(
                            {}, "error", False, [*messages, ["execution_interrupted", info]], interrupted=True
                        )
                    await asyncio.sleep(self.step_s)
                    progress = {"value": step + 1, "max": self.steps, "prompt_id": prompt_id, "node": node_id}
                    ctx.on_event("progress", progress)
                    if ctx.previews:
                        ctx.on_event("b_preview", png(step))
            if node["class_type"] in OUTPUT_NODES:
                prefix = node["inputs"].get("filename_prefix", "ComfyUI")
                image = ctx.save_image(png(self.runs), prefix, OUTPUT_NODES[node["class_type"]])
                outputs[node_id] = {"images": [image]}
                ctx.on_event(
                    "executed",
                    {
                        "node": node_id,
                        "display_node": node_id,
                        "output": outputs[node_id],
                        "prompt_id": prompt_id,
                    },
                )
        done = {"prompt_id": prompt_id, "timestamp": int(time.time() * 1000)}
        ctx.on_event("execution_success", done)
        return Result(outputs, "success", True, [*messages, ["execution_success", done]])

    def object_info(self, ctx: Any = None) -> dict[str, Any]:
        inputs = ctx.list_inputs() if ctx is not None else []
        return {
            "LoadImage": {"input": {"required": {"image": [inputs]}}},
            "KSampler": {"input": {"required": {}}},
        }

    def object_info_one(self, name: str, ctx: Any = None) -> dict[str, Any]:
        info = self.object_info(ctx)
        return {name: info[name]} if name in info else {}

    def model_folders(self) -> dict[str, list[str]]:
        return {"checkpoints": ["digits"], "vae": [], "unet": []}

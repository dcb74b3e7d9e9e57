"""Validation never raises: random damage to a real workflow, deep and wide graphs, hostile values.
Every answer is JSON (the 400 body) in ComfyUI's shape."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from service.comfy import Comfy
from service.comfy.testing import MemoryContext
from service.comfy.validate import MAX_NODES

from .conftest import run
from .workflows import fresh, open_webui

JUNK: list[Any] = [
    None, True, -1, 0, 2**70, -(2**70), 1.5, float("inf"), float("nan"), "", "x" * 200_000, "20", "1e5",
    [], ["4"], ["4", 0, 1], ["4", "0"], ["nope", 0], ["4", -1], ["4", 99], [True, 0], [["4"], 0],
    [{"a": 1}, 0], {}, {"a": [1, 2]}, [None, None],
]  # fmt: skip


def shaped(v: Any) -> None:
    body = v.body()
    json.dumps(body, allow_nan=False)
    if not v.ok:
        assert set(body["error"]) == {"type", "message", "details", "extra_info"}
    for entry in body["node_errors"].values():
        assert set(entry) == {"errors", "dependent_outputs", "class_type"}
        for e in entry["errors"]:
            assert set(e) == {"type", "message", "details", "extra_info"}


def test_random_damage_never_raises(store: Path) -> None:
    async def scenario(comfy: Comfy) -> None:
        rng = random.Random(0)
        base = open_webui("digits", "a 1", 16, 16, 1, 2, 0)
        for _ in range(400):
            wf = fresh(base)
            for _ in range(rng.randint(1, 4)):
                node = rng.choice(list(wf))
                what = rng.random()
                if not isinstance(wf[node], dict) or not isinstance(wf[node].get("inputs"), dict):
                    wf[node] = {"class_type": "VAEDecode", "inputs": {"samples": [node, 0]}}  # a self-loop
                elif what < 0.6 and wf[node]["inputs"]:
                    wf[node]["inputs"][rng.choice(list(wf[node]["inputs"]))] = rng.choice(JUNK)
                elif what < 0.7:
                    wf[node]["inputs"] = rng.choice(JUNK)
                elif what < 0.8:
                    wf[node]["class_type"] = rng.choice(JUNK + ["KSampler", "SaveImage"])
                elif what < 0.9:
                    wf[node] = rng.choice(JUNK)
                else:
                    wf[str(rng.randint(0, 20))] = {
                        "class_type": "SaveImage",
                        "inputs": {"images": [node, rng.randint(0, 2)]},
                    }
            shaped(comfy.validate(wf))
        for bad in JUNK:
            shaped(comfy.validate(bad))
        r = await comfy.run({"1": {"class_type": "KSampler", "inputs": {}}}, "x", MemoryContext())
        assert r.status_str == "error" and r.messages[-1][0] == "execution_error"

    run(store, scenario)


def test_deep_and_wide_graphs_are_bounded(store: Path) -> None:
    async def scenario(comfy: Comfy) -> None:
        wf = fresh(open_webui("digits", "a 1", 16, 16, 1, 2, 0))
        prev = "6"
        for i in range(100, 100 + MAX_NODES - len(wf)):  # a chain as deep as a prompt may be
            wf[str(i)] = {
                "class_type": "ConditioningCombine",
                "inputs": {"conditioning_1": [prev, 0], "conditioning_2": ["7", 0]},
            }
            prev = str(i)
        wf["3"]["inputs"]["positive"] = [prev, 0]
        assert len(wf) == MAX_NODES and comfy.validate(wf).ok
        wf["too_many"] = {"class_type": "EmptyLatentImage", "inputs": {}}
        v = comfy.validate(wf)
        assert v.error["type"] == "invalid_prompt" and str(MAX_NODES) in v.error["message"]

    run(store, scenario)

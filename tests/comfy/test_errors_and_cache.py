"""Malformed graphs get ComfyUI's error shapes (never an exception); the output cache re-runs only
what changed; interrupts and failures inside a node end the run as ComfyUI reports them."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from service.comfy import Comfy
from service.comfy.testing import MemoryContext
from tests.support.hostile_images import bomb_png

from .conftest import run
from .workflows import fresh, open_webui

WF = open_webui("digits", "a 3", 64, 64, 1, 4, 11)


def node_error_types(v: Any, node: str) -> list[str]:
    return [e["type"] for e in v.node_errors[node]["errors"]]


def test_malformed_graphs_are_comfyui_errors(store: Path) -> None:
    async def scenario(comfy: Comfy) -> None:
        for bad in (None, [], "x", 5):
            v = comfy.validate(bad)
            assert not v.ok and v.error["type"] == "invalid_prompt"

        wf = fresh(WF)
        wf["3"]["class_type"] = "FancySampler"
        v = comfy.validate(wf)
        assert v.error == {
            "type": "invalid_prompt",
            "message": "Cannot execute because node FancySampler does not exist.",
            "details": "Node ID '#3'",
            "extra_info": {},
        }
        assert v.node_errors["3"]["class_type"] == "FancySampler"

        wf = fresh(WF)
        del wf["4"]["class_type"]
        assert (
            comfy.validate(wf).error["message"]
            == "Cannot execute because a node is missing the class_type property."
        )

        wf = {k: n for k, n in fresh(WF).items() if k != "9"}
        assert comfy.validate(wf).error["type"] == "prompt_no_outputs"

        wf = fresh(WF)
        del wf["3"]["inputs"]["steps"]
        v = comfy.validate(wf)
        assert v.error["type"] == "prompt_outputs_failed_validation"
        assert v.node_errors["3"]["errors"][0] == {
            "type": "required_input_missing",
            "message": "Required input is missing",
            "details": "steps",
            "extra_info": {"input_name": "steps"},
        }
        assert v.node_errors["3"]["dependent_outputs"] == ["9"]

        wf = fresh(WF)
        wf["3"]["inputs"]["positive"] = ["5", 0]  # a LATENT where CONDITIONING goes
        v = comfy.validate(wf)
        assert node_error_types(v, "3") == ["return_type_mismatch"]
        assert v.node_errors["3"]["errors"][0]["extra_info"]["received_type"] == "LATENT"

        wf = fresh(WF)
        wf["3"]["inputs"]["model"] = ["42", 0]  # no node 42
        assert node_error_types(comfy.validate(wf), "3") == ["bad_linked_input"]
        wf["3"]["inputs"]["model"] = ["4", 7]  # no output 7
        assert node_error_types(comfy.validate(wf), "3") == ["return_type_mismatch"]
        wf["3"]["inputs"]["model"] = ["4"]
        assert node_error_types(comfy.validate(wf), "3") == ["bad_linked_input"]

        wf = fresh(WF)  # a cycle: the sampler's latent comes from the decoder downstream of it
        wf["10"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["8", 0], "vae": ["4", 2]}}
        wf["3"]["inputs"]["latent_image"] = ["10", 0]
        v = comfy.validate(wf)
        assert not v.ok
        assert "dependency_cycle" in [e["type"] for n in v.node_errors.values() for e in n["errors"]]

        wf = fresh(WF)
        wf["3"]["inputs"]["steps"] = 0
        wf["3"]["inputs"]["cfg"] = float("nan")
        wf["5"]["inputs"]["batch_size"] = 100000
        wf["3"]["inputs"]["sampler_name"] = "warp_drive"
        v = comfy.validate(wf)
        assert sorted(node_error_types(v, "3")) == [
            "invalid_input_type",
            "value_not_in_list",
            "value_smaller_than_min",
        ]
        batch = v.node_errors["5"]["errors"][0]
        assert batch["type"] == "value_bigger_than_max" and batch["details"] == "batch_size"
        assert batch["message"] == f"Value 100000 bigger than max of {comfy.service.settings.max_images}"
        unlisted = [e for e in v.node_errors["3"]["errors"] if e["type"] == "value_not_in_list"][0]
        assert unlisted["details"].startswith("sampler_name: 'warp_drive' not in (list of length")

        wf = fresh(WF)
        wf["4"]["inputs"]["ckpt_name"] = "model.safetensors"  # Open WebUI's default, not in our store
        v = comfy.validate(wf)
        assert node_error_types(v, "4") == ["value_not_in_list"]
        assert (
            v.node_errors["4"]["errors"][0]["details"]
            == "ckpt_name: 'model.safetensors' not in ['digits', 'sd1']"
        )

        # ComfyUI's spellings we resolve pass, numbers as strings are converted as ComfyUI does
        wf = fresh(WF)
        wf["3"]["inputs"].update(sampler_name="dpmpp_2m_sde_gpu", scheduler="karras", steps="4", cfg="7.5")
        wf["4"]["inputs"]["ckpt_name"] = "digits.safetensors"
        v = comfy.validate(wf)
        assert v.ok, v.node_errors
        assert v.prompt["3"]["inputs"]["steps"] == 4 and v.prompt["3"]["inputs"]["cfg"] == 7.5

    run(store, scenario)


def test_a_bomb_in_base64_is_a_node_error_not_a_decode(store: Path) -> None:
    async def scenario(comfy: Comfy) -> None:
        wf = fresh(WF)
        wf["10"] = {
            "class_type": "ETN_LoadImageBase64",
            "inputs": {"image": base64.b64encode(bomb_png(12000, 12000)).decode()},
        }
        wf["11"] = {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}}
        v = comfy.validate(wf)
        assert v.ok and v.outputs == ["9"]  # the other output still runs, as ComfyUI does
        err = v.node_errors["10"]["errors"][0]
        assert err["type"] == "custom_validation_failed" and "pixels" in err["details"]
        assert v.node_errors["10"]["dependent_outputs"] == ["11"]
        wf["10"]["inputs"]["image"] = "not base64 at all!"
        assert (
            v.node_errors
            and comfy.validate(wf).node_errors["10"]["errors"][0]["type"] == "custom_validation_failed"
        )
        ctx = MemoryContext()
        wf["11"]["inputs"]["images"] = ["8", 0]
        wf.pop("10")
        r = await comfy.run(wf, "two", ctx)
        assert r.status_str == "success" and sorted(r.outputs) == ["11", "9"]
        assert r.outputs["11"]["images"][0]["type"] == "temp"

    run(store, scenario)


def test_cache_reruns_only_what_changed(store: Path) -> None:
    async def scenario(comfy: Comfy) -> None:
        ctx = MemoryContext(owner="a")
        first = await comfy.run(fresh(WF), "1", ctx)
        assert first.cached == [] and sorted(first.executed) == ["3", "4", "5", "6", "7", "8", "9"]
        jobs = len(comfy.service.jobs.list())

        again = await comfy.run(fresh(WF), "2", ctx)  # identical: nothing runs, the outputs come back
        assert sorted(again.cached) == ["3", "4", "5", "6", "7", "8", "9"] and again.executed == []
        assert again.outputs == first.outputs and len(comfy.service.jobs.list()) == jobs
        assert ("execution_cached", sorted(again.cached)) in [
            (k, sorted(d["nodes"])) for k, d in ctx.events if k == "execution_cached"
        ]

        wf = fresh(WF)
        wf["3"]["inputs"]["seed"] = 12
        changed = await comfy.run(wf, "3", ctx)
        assert sorted(changed.cached) == ["4", "5", "6", "7"] and changed.executed == ["3", "8", "9"]
        assert changed.outputs != first.outputs

        other = await comfy.run(fresh(WF), "4", MemoryContext(owner="b"))  # another caller: its own
        assert other.cached == []

    run(store, scenario)


def test_failures_and_interrupts_end_the_run_as_comfyui_reports_them(store: Path) -> None:
    async def scenario(comfy: Comfy) -> None:
        wf = fresh(WF)
        wf["3"]["inputs"]["denoise"] = 0.5  # img2img from an empty latent
        ctx = MemoryContext()
        r = await comfy.run(wf, "e", ctx)
        assert r.status_str == "error" and not r.completed
        err = r.error
        assert (
            err["node_id"] == "3" and err["node_type"] == "KSampler" and "denoise" in err["exception_message"]
        )
        assert sorted(err["executed"]) == ["4", "5", "6", "7"]
        assert [m[0] for m in r.messages] == ["execution_start", "execution_cached", "execution_error"]

        wf = fresh(WF)
        wf["3"]["inputs"]["steps"] = 200
        ctx = MemoryContext()
        task = comfy.run(wf, "i", ctx)
        import asyncio

        async def interrupt() -> None:
            while "progress" not in ctx.kinds():
                await asyncio.sleep(0.01)
            ctx.cancel = True

        r, _ = await asyncio.gather(task, interrupt())
        assert r.interrupted and r.status_str == "error"
        assert r.messages[-1][0] == "execution_interrupted" and r.messages[-1][1]["node_id"] == "3"
        assert all(j.status.finished for j in comfy.service.jobs.list())

    run(store, scenario)

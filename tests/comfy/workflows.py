"""The real frontends' ComfyUI workflows, verbatim (API format), and how each fills them in.

- Open WebUI: ``COMFYUI_DEFAULT_WORKFLOW`` of backend/open_webui/config.py; its node mapping
  (utils/images/comfyui.py ``_apply_workflow_nodes``) sets inputs by node id and key.
- SillyTavern: default/content/Default_Comfy_Workflow.json and Char_Avatar_Comfy_Workflow.json;
  src/endpoints/stable-diffusion.js / the extension replace each ``"%name%"`` (quotes included) with
  the JSON of the value, so numbers arrive as numbers.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data"

OPEN_WEBUI_DEFAULT = (DATA / "open_webui_default.json").read_text()

SILLYTAVERN_DEFAULT = (DATA / "sillytavern_Default_Comfy_Workflow.json").read_text()

SILLYTAVERN_AVATAR = (DATA / "sillytavern_Char_Avatar_Comfy_Workflow.json").read_text()


def open_webui(
    model: str, prompt: str, width: int, height: int, n: int, steps: int, seed: int, negative: str = ""
) -> dict[str, Any]:
    """Open WebUI's default workflow with its default node mapping applied (model -> 4.ckpt_name,
    prompt -> 6.text, negative -> 7.text, width/height/n -> 5, steps/seed -> 3)."""
    wf = json.loads(OPEN_WEBUI_DEFAULT)
    wf["4"]["inputs"]["ckpt_name"] = model
    wf["6"]["inputs"]["text"] = prompt
    wf["7"]["inputs"]["text"] = negative
    wf["5"]["inputs"].update(width=width, height=height, batch_size=n)
    wf["3"]["inputs"].update(steps=steps, seed=seed)
    return wf


def sillytavern(template: str, **values: Any) -> dict[str, Any]:
    """SillyTavern's filling: each ``"%name%"`` -> the JSON of its value."""
    text = template
    for name, value in values.items():
        text = text.replace(f'"%{name}%"', json.dumps(value))
    return json.loads(text)


def fresh(wf: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(wf)

"""Open WebUI's and SillyTavern's ComfyUI clients, replayed request by request from their public
source, for the live-server tests (test_comfy_frontends.py).

- Open WebUI (backend/open_webui/utils/images/comfyui.py, routers/images.py): ``verify_url`` and
  ``get_models`` read ``GET /object_info``; generating opens ``/ws?clientId=<uuid4>`` (Bearer header,
  a failed handshake = no image), posts ``{prompt, client_id}`` to ``/prompt`` (``User-Agent:
  Mozilla/5.0`` + Bearer), reads the socket until ``executing`` with ``node: null`` for its
  prompt id (binary frames skipped), fetches ``/history/{id}``, keeps the images of ``SaveImage`` /
  ``PreviewImage`` nodes and fetches each ``/view`` URL, requiring an ``image/*`` content type.
  Editing first uploads each image to ``/api/upload/image`` (multipart ``image`` + ``type=input``)
  and sets the returned names through the ``image`` node mapping. An empty key still sends
  ``Authorization: Bearer `` (which reaches the server as ``Bearer``).
- SillyTavern (src/endpoints/stable-diffusion.js, the ``comfy`` router): ping = ``GET /system_stats``;
  samplers / models / schedulers / VAEs / UNETs from ``GET /object_info`` read without optional
  chaining; generate posts the browser's text ``{"prompt": <filled workflow>}`` as is (node-fetch
  sends a string as ``text/plain;charset=UTF-8``), polls ``GET /history`` every 100 ms until its id
  appears, fails on ``status_str == "error"``, fetches the first output image from ``/view`` (query
  built by string interpolation), and on client disconnect posts ``/interrupt``.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import uuid
from typing import Any

import httpx
from websockets.sync.client import connect

UA = {"User-Agent": "Mozilla/5.0"}

# Open WebUI's node mapping for its default workflow (admin settings, REQUIRED_WORKFLOW_NODES keys)
OPEN_WEBUI_NODES: list[dict[str, Any]] = [
    {"type": "prompt", "key": "text", "node_ids": ["6"]},
    {"type": "negative_prompt", "key": "text", "node_ids": ["7"]},
    {"type": "model", "key": "ckpt_name", "node_ids": ["4"]},
    {"type": "width", "key": "width", "node_ids": ["5"]},
    {"type": "height", "key": "height", "node_ids": ["5"]},
    {"type": "n", "key": "batch_size", "node_ids": ["5"]},
    {"type": "steps", "key": "steps", "node_ids": ["3"]},
    {"type": "seed", "key": "seed", "node_ids": ["3"]},
]


def apply_nodes(
    workflow: dict[str, Any], nodes: list[dict[str, Any]], model: str, payload: dict[str, Any]
) -> None:
    """``_apply_workflow_nodes``: each mapped input set by node id and key (the keys' defaults
    as in its source: text / width / height / batch_size / steps)."""
    defaults = {"prompt": "text", "negative_prompt": "text", "width": "width", "height": "height"}
    defaults |= {"n": "batch_size", "steps": "steps"}
    for node in nodes:
        kind, key = node.get("type"), node.get("key")
        for i, node_id in enumerate(node["node_ids"]):
            inputs = workflow[node_id]["inputs"]
            if kind == "model":
                inputs[key] = model
            elif kind == "image":
                images = payload["image"]
                if isinstance(images, list):
                    if i < len(images):
                        inputs[key] = images[i]
                else:
                    inputs[key] = images
            elif kind == "seed":
                inputs[key] = payload.get("seed") or 1234
            elif kind in defaults:
                inputs[key or defaults[kind]] = payload[kind]
            else:
                inputs[key] = node.get("value")


class OpenWebUI:
    def __init__(self, base_url: str, api_key: str = "") -> None:
        self.base, self.key = base_url, api_key
        self.frames: list[bytes] = []  # the binary frames it skipped (kept to check them)
        self.messages: list[dict[str, Any]] = []

    def _auth(self) -> dict[str, str]:
        # f"Bearer {api_key}": HTTP drops the trailing space of an empty key's header
        return {"Authorization": f"Bearer {self.key}".strip()}

    def verify_url(self) -> bool:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else None
        return httpx.get(f"{self.base}/object_info", headers=headers, timeout=60).is_success

    def models(self, workflow: dict[str, Any], nodes: list[dict[str, Any]]) -> list[str]:
        info = httpx.get(f"{self.base}/object_info", headers=self._auth(), timeout=60).json()
        model_node = next(n["node_ids"][0] for n in nodes if n["type"] == "model")
        required = info[workflow[model_node]["class_type"]]["input"]["required"]
        key = next(k for k in required if "_name" in k)
        return list(required[key][0])

    def upload(self, png: bytes) -> str:
        """``comfyui_upload_image``: multipart image + type=input to /api/upload/image."""
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        files = {"image": (f"{uuid.uuid4()}.png", png, "image/png")}
        r = httpx.post(f"{self.base}/api/upload/image", files=files, data={"type": "input"}, headers=headers)
        r.raise_for_status()
        return str(r.json()["name"])

    def run(self, workflow: dict[str, Any], timeout: float = 120) -> tuple[str, list[tuple[bytes, str]]]:
        """``comfyui_create_image`` / ``_edit_image``: socket, /prompt, wait, /history, /view."""
        client_id = str(uuid.uuid4())
        ws_url = self.base.replace("http://", "ws://")
        with connect(f"{ws_url}/ws?clientId={client_id}", additional_headers=self._auth()) as ws:
            r = httpx.post(
                f"{self.base}/prompt",
                json={"prompt": workflow, "client_id": client_id},
                headers={**UA, **self._auth()},
            )
            r.raise_for_status()
            prompt_id = r.json()["prompt_id"]
            deadline = time.monotonic() + timeout
            while True:
                message = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
                if isinstance(message, bytes):
                    self.frames.append(message)
                if isinstance(message, str):
                    m = json.loads(message)
                    self.messages.append(m)
                    if (
                        m["type"] == "executing"
                        and m["data"]["node"] is None
                        and m["data"]["prompt_id"] == prompt_id
                    ):
                        break
        history = httpx.get(f"{self.base}/history/{prompt_id}", headers={**UA, **self._auth()}).json()[
            prompt_id
        ]
        urls = []
        for node_id, output in history["outputs"].items():
            if workflow.get(node_id, {}).get("class_type") in ("SaveImage", "PreviewImage"):
                for image in output.get("images", []):
                    query = urllib.parse.urlencode(
                        {
                            "filename": image["filename"],
                            "subfolder": image["subfolder"],
                            "type": image["type"],
                        }
                    )
                    urls.append(f"{self.base}/view?{query}")
        images = []
        for url in urls:  # get_image_data: the admin's key when one is set
            got = httpx.get(url, headers={"Authorization": f"Bearer {self.key}"} if self.key else None)
            got.raise_for_status()
            assert got.headers["content-type"].split("/")[0] == "image", got.headers
            images.append((got.content, got.headers["content-type"]))
        return prompt_id, images


class SillyTavern:
    def __init__(self, base_url: str, auth: str = "") -> None:
        self.base, self.auth = base_url, auth

    def ping(self) -> bool:
        return httpx.get(f"{self.base}/system_stats", timeout=60).is_success

    def lists(self) -> dict[str, list[str]]:
        def object_info() -> Any:
            return httpx.get(f"{self.base}/object_info", timeout=60).json()

        return {  # one /object_info per list, as its routes each fetch it
            "samplers": object_info()["KSampler"]["input"]["required"]["sampler_name"][0],
            "models": [
                m for m in object_info()["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
            ],
            "schedulers": object_info()["KSampler"]["input"]["required"]["scheduler"][0],
            "vaes": object_info()["VAELoader"]["input"]["required"]["vae_name"][0],
            "unets": object_info()["UNETLoader"]["input"]["required"]["unet_name"][0],
        }

    def submit(self, workflow_text: str) -> str:
        # the browser's body, verbatim: `{\n "prompt": ${workflow}\n }`; node-fetch: text/plain
        body = f'{{\n                "prompt": {workflow_text}\n            }}'
        r = httpx.post(
            f"{self.base}/prompt", content=body, headers={"Content-Type": "text/plain;charset=UTF-8"}
        )
        assert r.is_success, r.text
        return str(r.json()["prompt_id"])

    def wait(self, prompt_id: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            item = httpx.get(f"{self.base}/history", timeout=60).json().get(prompt_id)
            if item:
                return item  # type: ignore[no-any-return]
            time.sleep(0.1)
        raise AssertionError(f"{prompt_id} never appeared in /history")

    def image(self, item: dict[str, Any]) -> bytes:
        assert item["status"]["status_str"] != "error", item["status"]
        info = [img for out in item["outputs"].values() for img in out["images"]][0]
        url = (
            f"{self.base}/view?filename={info['filename']}&subfolder={info['subfolder']}&type={info['type']}"
        )
        r = httpx.get(url)
        assert r.is_success, r.text
        return r.content

    def interrupt(self) -> None:
        import base64

        auth = "Basic " + base64.b64encode(self.auth.encode()).decode()
        httpx.post(f"{self.base}/interrupt", headers={"Authorization": auth.strip()})

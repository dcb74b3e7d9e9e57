"""The ComfyUI routes' own behaviour (service/api/comfy) over a stand-in executor: body parsing whatever
the content type, ComfyUI's error bodies, the order clients rely on (history before ``executing:
null``), per-key isolation of prompts, history, files and socket events, uploads through the image
gate, path traversal, interrupt and queue edits, bounds. The real executor runs in tests/e2e."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin
from starlette.websockets import WebSocketDisconnect

from service.api.app import create_app
from service.api.settings import Settings
from tests.support.hostile_images import bomb_png

from .standin import StandInComfy, png

KEY_A, KEY_B = "key-a", "key-b"
A, B = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}


def workflow(prefix: str = "ComfyUI", batch: int = 1) -> dict[str, Any]:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "digits"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 8, "height": 8, "batch_size": batch}},
        "3": {"class_type": "KSampler", "inputs": {"seed": 1, "model": ["4", 0], "latent_image": ["5", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["3", 0]}},
    }


@pytest.fixture(scope="module")
def make(store_root: Path) -> Iterator[Callable[..., TestClient]]:
    clients: list[TestClient] = []

    def build(standin: StandInComfy | None = None, **overrides: Any) -> TestClient:
        overrides.setdefault("torch_threads", 1)
        app = create_app(Settings(model_store=store_root, **overrides))
        app.state.comfy.comfy = standin or StandInComfy()
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return client

    yield build
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture(scope="module")
def open_client(make: Callable[..., TestClient]) -> TestClient:
    return make()


@pytest.fixture(scope="module")
def keyed(make: Callable[..., TestClient]) -> TestClient:
    return make(api_keys=[KEY_A, KEY_B])


def wait_history(client: TestClient, prompt_id: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        item = client.get(f"/history/{prompt_id}", headers=headers).json()
        if prompt_id in item:
            return item[prompt_id]  # type: ignore[no-any-return]
        time.sleep(0.01)
    raise AssertionError(f"no history for {prompt_id}")


# ---- bodies and errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded", None],
)
def test_a_json_body_is_read_whatever_the_content_type(
    open_client: TestClient, content_type: str | None
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    r = open_client.post("/prompt", content=json.dumps({"prompt": workflow()}), headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"prompt_id", "number", "node_errors"} and body["node_errors"] == {}
    assert wait_history(open_client, body["prompt_id"])["status"]["status_str"] == "success"


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (b"{not json", "invalid_prompt"),
        (b"", "invalid_prompt"),
        (b"[1, 2]", "no_prompt"),
        (b'{"client_id": "x"}', "no_prompt"),
        (b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", "invalid_prompt"),
        (b'{"prompt": "text"}', "invalid_prompt"),
        (
            json.dumps({"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}}).encode(),
            "invalid_prompt",
        ),
    ],
)
def test_bad_prompts_get_comfyui_error_bodies(open_client: TestClient, body: bytes, kind: str) -> None:
    r = open_client.post("/prompt", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    out = r.json()
    assert set(out) == {"error", "node_errors"}
    assert out["error"]["type"] == kind and {"message", "details", "extra_info"} <= set(out["error"])


def test_node_errors_come_back_as_the_executor_names_them(open_client: TestClient) -> None:
    r = open_client.post("/prompt", json={"prompt": workflow(batch=100000)})
    assert r.status_code == 400
    errors = r.json()["node_errors"]["5"]
    assert (
        errors["class_type"] == "EmptyLatentImage" and errors["errors"][0]["type"] == "value_bigger_than_max"
    )


# ---- the order clients rely on, sockets ---------------------------------------------------------


def test_history_is_written_before_executing_null_and_events_arrive_in_order(open_client: TestClient) -> None:
    with open_client.websocket_connect("/ws?clientId=order") as ws:
        hello = ws.receive_json()
        assert hello == {
            "type": "status",
            "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "order"},
        }
        pid = open_client.post("/prompt", json={"prompt": workflow(), "client_id": "order"}).json()[
            "prompt_id"
        ]
        kinds = []
        while True:
            message = ws.receive()
            if message.get("bytes") is not None:
                frame = message["bytes"]
                assert frame[:8] == b"\x00\x00\x00\x01\x00\x00\x00\x02" and frame[8:12] == b"\x89PNG"
                kinds.append("preview")
                continue
            m = json.loads(message["text"])
            kinds.append(m["type"])
            if m["type"] == "executing" and m["data"]["node"] is None:
                assert m["data"]["prompt_id"] == pid
                # the moment a client sees it, the history item is there (Open WebUI fetches at once)
                assert pid in open_client.get(f"/history/{pid}").json()
                break
        assert ws.receive_json()["type"] == "status"
    assert kinds[0] == "status" and kinds[1] == "execution_start"
    assert kinds.count("progress") == 3 and kinds.count("preview") == 3
    assert kinds.index("executed") < kinds.index("execution_success") < len(kinds) - 1


def test_previews_are_off_when_the_prompt_says_so(open_client: TestClient) -> None:
    with open_client.websocket_connect("/api/ws?clientId=quiet") as ws:
        ws.receive_json()
        body = {"prompt": workflow(), "client_id": "quiet", "extra_data": {"preview_method": "none"}}
        assert open_client.post("/api/prompt", json=body).status_code == 200
        while True:
            message = ws.receive()
            assert message.get("bytes") is None, "a preview frame although previews are off"
            m = json.loads(message["text"])
            if m["type"] == "executing" and m["data"]["node"] is None:
                break


def test_a_bare_bearer_header_passes_without_keys_and_fails_with_them(
    open_client: TestClient, keyed: TestClient
) -> None:
    bare = {"Authorization": "Bearer"}  # Open WebUI with no key configured ("Bearer " stripped)
    assert open_client.post("/prompt", json={"prompt": workflow()}, headers=bare).status_code == 200
    with open_client.websocket_connect("/ws?clientId=bare", headers=bare) as ws:
        assert ws.receive_json()["type"] == "status"
    for path in ("/prompt", "/history", "/queue", "/object_info", "/system_stats", "/view?filename=x.png"):
        assert keyed.get(path, headers=bare).status_code in (401, 405), path
    assert keyed.post("/prompt", json={"prompt": workflow()}, headers=bare).status_code == 401
    for headers in (bare, {}, {"Authorization": "Bearer wrong"}):
        with pytest.raises(WebSocketDisconnect):
            with keyed.websocket_connect("/ws?clientId=x", headers=headers) as ws:
                ws.receive_json()
    with keyed.websocket_connect("/ws?clientId=x", headers=A) as ws:
        assert ws.receive_json()["type"] == "status"


def test_keys_see_only_their_own_prompts_history_files_and_events(keyed: TestClient) -> None:
    with (
        keyed.websocket_connect("/ws?clientId=same", headers=A) as ws_a,
        keyed.websocket_connect("/ws?clientId=same", headers=B) as ws_b,
    ):
        ws_a.receive_json(), ws_b.receive_json()
        body = {"prompt": workflow(prefix="only_a"), "client_id": "same"}
        pid = keyed.post("/prompt", json=body, headers=A).json()["prompt_id"]
        item = wait_history(keyed, pid, A)
        seen_by_a: list[dict[str, Any]] = []
        while (
            not seen_by_a or seen_by_a[-1]["type"] != "executing" or seen_by_a[-1]["data"]["node"] is not None
        ):
            m = ws_a.receive()
            if m.get("text"):
                seen_by_a.append(json.loads(m["text"]))
        assert "executed" in [m["type"] for m in seen_by_a]
        # B, with the same client id under another key, got nothing of A's prompt: the next thing on
        # B's socket is its own prompt's first event
        other = keyed.post("/prompt", json={"prompt": workflow(), "client_id": "same"}, headers=B).json()
        first = ws_b.receive_json()
        assert first["type"] == "status" or first["data"].get("prompt_id") == other["prompt_id"]
        while True:
            m = ws_b.receive()
            if m.get("text"):
                data = json.loads(m["text"])["data"]
                assert data.get("prompt_id") in (None, other["prompt_id"]), data
                if json.loads(m["text"])["type"] == "executing" and data["node"] is None:
                    break
    assert keyed.get(f"/history/{pid}", headers=B).json() == {}
    assert pid not in keyed.get("/history", headers=B).json()
    image = item["outputs"]["9"]["images"][0]
    query = f"/view?filename={image['filename']}&subfolder={image['subfolder']}&type={image['type']}"
    assert keyed.get(query, headers=A).status_code == 200
    assert keyed.get(query, headers=B).status_code == 404


# ---- files ---------------------------------------------------------------------------------------


def _upload(client: TestClient, data: bytes, name: str = "in.png", **fields: str) -> Any:
    return client.post("/api/upload/image", files={"image": (name, data, "image/png")}, data=fields)


def test_uploads_go_through_the_gate_get_new_names_and_are_served_back(open_client: TestClient) -> None:
    first = _upload(open_client, png(1), "up.png", type="input")
    assert first.status_code == 200 and first.json() == {"name": "up.png", "subfolder": "", "type": "input"}
    assert _upload(open_client, png(1), "up.png").json()["name"] == "up.png"  # same bytes: reused
    assert _upload(open_client, png(2), "up.png").json()["name"] == "up (1).png"
    assert _upload(open_client, png(3), "up.png").json()["name"] == "up (2).png"
    assert _upload(open_client, png(4), "up.png", overwrite="true").json()["name"] == "up.png"
    view = open_client.get("/view?filename=up.png&type=input&subfolder=")
    assert view.status_code == 200 and view.headers["content-type"] == "image/png" and view.content == png(4)
    sub = _upload(open_client, png(5), "s.png", subfolder="a/b")
    assert sub.json() == {"name": "s.png", "subfolder": "a/b", "type": "input"}
    assert open_client.get("/api/view?filename=s.png&subfolder=a/b&type=input").content == png(5)
    listed = open_client.get("/object_info/LoadImage").json()["LoadImage"]["input"]["required"]["image"][0]
    assert {"up.png", "up (1).png", "a/b/s.png"} <= set(listed)


@pytest.mark.parametrize(
    ("data", "name", "fields"),
    [
        (b"not an image at all", "x.png", {}),
        (bomb_png(5000, 5000, colour_type=0), "bomb.png", {}),
        (png(1), "../escape.png", {}),
        (png(1), "x.png", {"subfolder": "../../etc"}),
        (png(1), "x.png", {"type": "models"}),
    ],
)
def test_hostile_uploads_are_refused(
    open_client: TestClient, data: bytes, name: str, fields: dict[str, str]
) -> None:
    r = _upload(open_client, data, name, **fields)
    if name == "../escape.png":  # the client's path is dropped, as browsers send only a base name
        assert r.status_code == 200 and r.json()["name"] == "escape.png"
    else:
        assert r.status_code == 400, r.text


def test_uploads_that_are_not_multipart_are_refused(open_client: TestClient) -> None:
    assert (
        open_client.post("/upload/image", content=png(1), headers={"Content-Type": "image/png"}).status_code
        == 400
    )
    assert open_client.post("/upload/image", data={"type": "input"}).status_code == 400


@pytest.mark.parametrize(
    "query",
    [
        "filename=../../../etc/passwd",
        "filename=/etc/passwd",
        "filename=x.png&subfolder=../../..",
        "filename=x.png&subfolder=/etc",
        "filename=x.png&type=../input",
        "filename=..",
    ],
)
def test_view_refuses_paths_out_of_the_folder(open_client: TestClient, query: str) -> None:
    assert open_client.get(f"/view?{query}").status_code in (400, 404)


def _rgba(size: int = 8) -> bytes:
    """An RGBA PNG whose alpha is a left-right ramp, with a text chunk as our PNGs carry."""
    img = Image.new("RGBA", (size, size), (10, 200, 30, 255))
    for x in range(size):
        for y in range(size):
            img.putpixel((x, y), (10 + x, 200, 30, 255 - 30 * x))
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", "{}")
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_view_preview_and_channel_as_comfyui(open_client: TestClient) -> None:
    """ComfyUI's /view: preview=format;quality re-encodes (webp unless jpeg; webp when the alpha is
    asked for), channel=rgb drops the alpha, channel=a is the alpha alone; the file otherwise."""
    _upload(open_client, _rgba(), "v.png", overwrite="true")
    base = "/view?filename=v.png&type=input"
    jpeg = open_client.get(base + "&preview=jpeg;50")
    assert jpeg.headers["content-type"] == "image/jpeg" and _open(jpeg.content).format == "JPEG"
    assert 'filename="v.jpeg"' in jpeg.headers["content-disposition"]
    webp = open_client.get(base + "&preview=webp;90&channel=a")
    assert webp.headers["content-type"] == "image/webp" and _open(webp.content).mode == "RGBA"
    assert open_client.get(base + "&preview=gif").headers["content-type"] == "image/webp"
    rgb = _open(open_client.get(base + "&channel=rgb").content)
    assert rgb.mode == "RGB" and rgb.getpixel((3, 0)) == (13, 200, 30)
    alpha = _open(open_client.get(base + "&channel=a").content)
    assert alpha.mode == "RGBA" and alpha.getpixel((3, 0)) == (0, 0, 0, 255 - 90)
    assert open_client.get(base + "&channel=rgba").content == _rgba()
    assert open_client.get(base + "&preview=jpeg;999").status_code == 200  # quality capped at 100


def test_upload_mask_puts_the_masks_alpha_on_the_original(open_client: TestClient) -> None:
    """ComfyUI's mask editor posts the painted mask as ``image`` with ``original_ref``: the stored file
    is the original's pixels (and text chunks) with the mask's alpha."""
    _upload(open_client, _rgba(), "photo.png", overwrite="true")
    mask = Image.new("RGBA", (8, 8), (0, 0, 0, 255))
    mask.putpixel((2, 5), (0, 0, 0, 0))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    ref = json.dumps({"filename": "photo.png", "subfolder": "", "type": "input"})
    fields = {"original_ref": ref, "type": "input", "subfolder": "clipspace"}
    files = {"image": ("clipspace-mask-1.png", buf.getvalue(), "image/png")}
    r = open_client.post("/upload/mask", files=files, data=fields)
    assert r.json() == {"name": "clipspace-mask-1.png", "subfolder": "clipspace", "type": "input"}
    got = _open(open_client.get("/view?filename=clipspace-mask-1.png&subfolder=clipspace&type=input").content)
    assert got.getpixel((2, 5)) == (12, 200, 30, 0) and got.getpixel((3, 0)) == (13, 200, 30, 255)
    assert got.text["prompt"] == "{}"  # type: ignore[attr-defined]
    bad = {"original_ref": json.dumps({"filename": "nope.png", "type": "input"})}
    assert open_client.post("/api/upload/mask", files=files, data=bad).status_code == 400
    assert open_client.post("/upload/mask", files=files, data={"original_ref": "{"}).status_code == 400
    for deep in ("[" * 100_000, '{"filename": ' + "[" * 100_000):  # json.loads: RecursionError
        r = open_client.post("/upload/mask", files=files, data={"original_ref": deep})
        assert r.status_code == 400 and r.text.startswith("original_ref must be JSON"), r.text


def test_view_of_a_missing_file_is_404(open_client: TestClient) -> None:
    assert open_client.get("/view?filename=nothing.png").status_code == 404
    assert open_client.get("/view").status_code == 404


# ---- interrupt, queue, history edits, bounds -----------------------------------------------------


def test_interrupt_stops_the_callers_running_prompt(make: Callable[..., TestClient]) -> None:
    client = make(StandInComfy(step_s=0.2, steps=50))
    pid = client.post("/prompt", json={"prompt": workflow()}).json()["prompt_id"]
    running = client.get("/queue").json()
    assert [e[1] for e in running["queue_running"]] == [pid] and running["queue_pending"] == []
    assert running["queue_running"][0][3] == {}  # extra_data, no client_id sent
    assert client.get("/prompt").json() == {"exec_info": {"queue_remaining": 1}}
    assert client.post("/interrupt", json={"prompt_id": "not-this-one"}).status_code == 200
    time.sleep(0.3)
    assert client.get("/queue").json()["queue_running"], "a targeted interrupt of another id stopped it"
    assert client.post("/interrupt", content=b"").status_code == 200
    item = wait_history(client, pid)
    assert (
        item["status"]["status_str"] == "error"
        and item["status"]["messages"][-1][0] == "execution_interrupted"
    )
    other = client.post("/prompt", json={"prompt": workflow()}).json()["prompt_id"]
    assert client.post("/queue", json={"delete": [other]}).status_code == 200
    assert wait_history(client, other)["status"]["messages"][-1][0] == "execution_interrupted"


@pytest.mark.parametrize(
    ("query", "window"),
    [  # ComfyUI's PromptQueue.get_history over 7 items: items[offset : offset + max_items]
        ("offset=0&max_items=2", slice(0, 2)),
        ("offset=3&max_items=2", slice(3, 5)),
        ("offset=5", slice(5, None)),
        ("offset=6&max_items=5", slice(6, 7)),
        ("offset=9&max_items=2", slice(0, 0)),
        ("max_items=2", slice(5, 7)),  # no offset: the last max_items
        ("offset=-1&max_items=2", slice(5, 7)),  # a negative offset is no offset
        ("offset=-3", slice(0, None)),
        ("max_items=9", slice(0, None)),
        ("max_items=0", slice(0, 0)),
        ("offset=2&max_items=0", slice(2, 3)),  # ComfyUI takes one before it counts
        ("offset=x&max_items=y", slice(0, None)),  # not numbers: ignored
    ],
)
def test_history_offset_and_max_items_window_as_comfyui(
    history_of_7: tuple[TestClient, list[str]], query: str, window: slice
) -> None:
    client, ids = history_of_7
    assert list(client.get(f"/history?{query}").json()) == ids[window]
    assert list(client.get(f"/api/history?{query}").json()) == ids[window]


@pytest.fixture(scope="module")
def history_of_7(make: Callable[..., TestClient]) -> tuple[TestClient, list[str]]:
    """A server with 7 finished prompts, and their ids in history order (oldest first)."""
    client = make()
    for pid in [client.post("/prompt", json={"prompt": workflow()}).json()["prompt_id"] for _ in range(7)]:
        wait_history(client, pid)
    ids = list(client.get("/history").json())
    assert len(ids) == 7
    return client, ids


def test_history_can_be_deleted_and_cleared_and_is_bounded(make: Callable[..., TestClient]) -> None:
    client = make(comfy_max_history=3)
    ids = [client.post("/prompt", json={"prompt": workflow()}).json()["prompt_id"] for _ in range(5)]
    for pid in ids:
        wait_history(client, pid) if pid in ids[2:] else None
    deadline = time.monotonic() + 10
    while len(client.get("/history").json()) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(client.get("/history").json()) == 3
    assert list(client.get("/history?max_items=1").json()) == [list(client.get("/history").json())[-1]]
    last = list(client.get("/history").json())[-1]
    assert client.post("/history", json={"delete": [last]}).status_code == 200
    assert last not in client.get("/history").json()
    assert client.post("/api/history", json={"clear": True}).status_code == 200
    assert client.get("/history").json() == {}
    big = workflow(prefix="x" * 100)  # a large workflow (a base64 avatar): served the same way
    big["4"]["inputs"]["note"] = "a" * 300_000
    pid = client.post("/prompt", json={"prompt": big}).json()["prompt_id"]
    wait_history(client, pid)
    assert client.get("/history").json()[pid]["prompt"][2]["4"]["inputs"]["note"] == "a" * 300_000


def test_history_outlives_a_restart_with_a_state_dir(store_root: Path, tmp_path: Path) -> None:
    """KDIFF_STATE_DIR (+ KDIFF_COMFY_DIR for the files): after a restart each key's history is as it
    was (order, deletions, numbering) and its images are still served."""
    dirs = {
        "state_dir": str(tmp_path / "state"),
        "comfy_dir": tmp_path / "files",
        "api_keys": f"{KEY_A},{KEY_B}",
    }

    def app() -> TestClient:
        made = create_app(Settings(model_store=store_root, torch_threads=1, **dirs))
        made.state.comfy.comfy = StandInComfy()
        return TestClient(made)

    with app() as client:
        ids = [
            client.post("/prompt", json={"prompt": workflow()}, headers=A).json()["prompt_id"]
            for _ in range(3)
        ]
        for pid in ids:
            wait_history(client, pid, A)
        other = client.post("/prompt", json={"prompt": workflow()}, headers=B).json()["prompt_id"]
        wait_history(client, other, B)
        assert client.post("/history", json={"delete": [ids[1]]}, headers=A).status_code == 200
        before = client.get("/history", headers=A).json()
    with app() as client:
        after = client.get("/history", headers=A).json()
        assert after == before and list(after) == [ids[0], ids[2]]
        assert list(client.get("/history", headers=B).json()) == [other]
        image = after[ids[2]]["outputs"]["9"]["images"][0]
        view = client.get("/view", params=image, headers=A)
        assert view.status_code == 200 and view.headers["content-type"] == "image/png"
        number = client.post("/prompt", json={"prompt": workflow()}, headers=A).json()["number"]
        assert number > after[ids[2]]["prompt"][0]


def test_too_many_prompts_in_flight_for_a_key_is_a_429(make: Callable[..., TestClient]) -> None:
    client = make(StandInComfy(step_s=0.5, steps=20), comfy_max_prompts=2)
    for _ in range(2):
        assert client.post("/prompt", json={"prompt": workflow()}).status_code == 200
    r = client.post("/prompt", json={"prompt": workflow()})
    assert r.status_code == 429 and r.json()["error"]["type"] == "queue_full"
    client.post("/interrupt")


def test_a_key_keeps_at_most_its_file_count(make: Callable[..., TestClient]) -> None:
    client = make(comfy_max_files=3)
    names = [_upload(client, png(i), f"f{i}.png").json()["name"] for i in range(5)]
    served = [client.get(f"/view?filename={n}&type=input").status_code for n in names]
    assert served == [404, 404, 200, 200, 200]


def test_routes_exist_under_api_too(open_client: TestClient) -> None:
    for path in ("/system_stats", "/object_info", "/object_info/KSampler", "/queue", "/history", "/prompt"):
        assert open_client.get(path).status_code == 200, path
        assert (
            open_client.get("/api" + path).json() == open_client.get(path).json() or path == "/system_stats"
        )
    assert open_client.get("/object_info/NoSuchNode").json() == {}
    assert open_client.get("/api/models").json() == ["checkpoints", "vae", "unet", "embeddings"]
    assert open_client.get("/models/embeddings").json() == []
    assert open_client.get("/api/models/checkpoints").json() == ["digits"]
    assert open_client.get("/models/nothing").status_code == 404
    assert isinstance(open_client.get("/models").json(), list | dict)  # our own /models keeps its shape
    stats = open_client.get("/system_stats").json()
    assert {"os", "ram_total", "ram_free", "python_version", "pytorch_version"} <= set(stats["system"])
    assert stats["devices"][0]["type"] == "cpu"


def test_a_slow_socket_never_holds_a_prompt_back(open_client: TestClient) -> None:
    """A client that connects and never reads: the prompt still finishes."""
    with open_client.websocket_connect("/ws?clientId=sleepy"):
        pid = open_client.post("/prompt", json={"prompt": workflow(), "client_id": "sleepy"}).json()[
            "prompt_id"
        ]
        assert wait_history(open_client, pid)["status"]["completed"] is True


def test_concurrent_prompts_all_finish(open_client: TestClient) -> None:
    ids: list[str] = []

    def post() -> None:
        ids.append(open_client.post("/prompt", json={"prompt": workflow()}).json()["prompt_id"])

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 8
    assert all(wait_history(open_client, pid)["status"]["status_str"] == "success" for pid in ids)


def test_hostile_save_prefixes_stay_inside_the_folder(open_client: TestClient) -> None:
    pid = open_client.post("/prompt", json={"prompt": workflow(prefix="../../../../tmp/evil")}).json()[
        "prompt_id"
    ]
    image = wait_history(open_client, pid)["outputs"]["9"]["images"][0]
    assert ".." not in image["subfolder"] and image["filename"].startswith("evil_")
    query = f"/view?filename={image['filename']}&subfolder={image['subfolder']}&type=output"
    assert Image.open(io.BytesIO(open_client.get(query).content)).size == (8, 8)


class _LoopWatchingComfy(StandInComfy):
    """Records, for each listing, whether it was built on a thread that runs an event loop."""

    def __init__(self) -> None:
        super().__init__()
        self.on_loop: dict[str, bool] = {}

    def _mark(self, name: str) -> None:
        try:
            asyncio.get_running_loop()
            self.on_loop[name] = True
        except RuntimeError:
            self.on_loop[name] = False

    def object_info(self, ctx: Any = None) -> dict[str, Any]:
        self._mark("object_info")
        return super().object_info(ctx)

    def object_info_one(self, name: str, ctx: Any = None) -> dict[str, Any]:
        self._mark("object_info_one")
        return super().object_info_one(name, ctx)

    def model_folders(self) -> dict[str, list[str]]:
        self._mark("model_folders")
        return super().model_folders()


def test_listings_that_scan_the_store_run_off_the_event_loop(make: Callable[..., TestClient]) -> None:
    # /object_info lists the store's files (directory scans, adapter layouts, encoder configs) per node.
    standin = _LoopWatchingComfy()
    client = make(standin)
    assert client.get("/object_info").status_code == 200
    assert client.get("/object_info/KSampler").status_code == 200
    assert client.get("/models").status_code == 200
    assert client.get("/models/checkpoints").status_code in (200, 404)
    assert standin.on_loop == {"object_info": False, "object_info_one": False, "model_folders": False}

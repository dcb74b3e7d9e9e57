"""Real frontend clients against a live server: the A1111 client ``webuiapi`` and the official
``openai`` SDK, both with auth on, on the tiny class-conditional model (8x8; prompts pick the class)."""

from __future__ import annotations

import base64
import io
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import webuiapi
from openai.types import ImageEditPartialImageEvent, ImageGenPartialImageEvent
from PIL import Image

from service import image_gate
from tests.support.server import Server
from tests.support.tiny_store import make_tiny_store

KEY = "sk-test"
BASIC = ("painter", "s3cret")  # a KDIFF_API_KEYS entry "user:pass" for HTTP Basic
SAME = {"steps": 4, "seed": 21}  # with sampler euler / schedule karras on every route


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    store = make_tiny_store(tmp_path_factory.mktemp("clients-store"))
    srv = Server(
        store,
        tmp_path_factory.mktemp("log") / "server.log",
        KDIFF_API_KEYS=",".join([KEY, f"{BASIC[0]}:{BASIC[1]}", "sk-idle", *(f"sk-c{i}" for i in range(16))]),
        KDIFF_MAX_STEPS="10000",
        KDIFF_MAX_BATCH_ROWS="64",
    )
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def _a1111(server: Server, key: str = KEY) -> Any:
    api = webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1", sampler="Euler", scheduler="Karras", steps=4)
    api.session.headers["Authorization"] = f"Bearer {key}"
    return api


def _oai(server: Server) -> Any:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=30)


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB")).astype(int)


def _b64_arr(data: str) -> np.ndarray:
    return _arr(Image.open(io.BytesIO(base64.b64decode(data))))


def test_webuiapi_lists_options_and_txt2img(server: Server) -> None:
    api = _a1111(server)
    assert "tiny" in api.util_get_model_names()
    assert {"Euler", "Euler a", "DPM++ 2M"} <= set(api.util_get_sampler_names())
    api.set_options({"sd_model_checkpoint": "tiny", "CLIP_stop_at_last_layers": 1})
    assert api.get_options()["sd_model_checkpoint"] == "tiny"
    result = api.txt2img(prompt="a 7", seed=5, batch_size=2, width=64, height=64)
    assert len(result.images) == 2 and result.images[0].size == (64, 64)
    assert result.info["all_seeds"] == [5, 6] and result.info["sampler_name"] == "Euler"
    assert (
        result.images[0].info["parameters"].startswith("a 7\nSteps: 4, Sampler: Euler, Schedule type: Karras")
    )
    assert api.png_info(result.images[0]).info.startswith("a 7\n")


def test_webuiapi_img2img_with_a_mask(server: Server) -> None:
    api = _a1111(server)
    init = Image.new("RGB", (8, 8), (200, 200, 200))
    mask = Image.new("L", (8, 8), 0)
    mask.paste(255, (4, 0, 8, 8))
    result = api.img2img(
        images=[init],
        mask_image=mask,
        mask_blur=0,
        prompt="3",
        seed=1,
        width=8,
        height=8,
        denoising_strength=0.9,
        inpainting_fill=1,
    )
    out = _arr(result.image)
    assert np.abs(out[:, :4] - 200).max() <= 3 and np.abs(out[:, 4:] - 200).max() > 3


def test_webuiapi_interrupt_ends_only_its_own_job(server: Server) -> None:
    api, other = _a1111(server), _a1111(server, key="sk-idle")
    done: dict[str, Any] = {}
    t = threading.Thread(
        target=lambda: done.setdefault("r", api.txt2img(prompt="1", steps=9000, width=8, height=8))
    )
    t.start()
    try:
        deadline = time.monotonic() + 20
        while api.get_progress()["state"]["sampling_step"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert api.get_progress()["state"]["job_count"] == 1
        assert other.get_progress()["state"]["job_count"] == 0
        other.interrupt()
        time.sleep(0.1)
        assert api.get_progress()["state"]["job_count"] == 1
        api.interrupt()
        t.join(20)
    finally:
        if t.is_alive():
            api.interrupt()
            t.join(20)
    assert done["r"].info["interrupted"] is True


def test_webuiapi_with_basic_auth(server: Server) -> None:
    api = webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1", username=BASIC[0], password=BASIC[1])
    assert len(api.txt2img(prompt="2", steps=2, width=8, height=8).images) == 1
    wrong = httpx.get(f"{server.url}/sdapi/v1/sd-models", auth=(BASIC[0], "wrong"))
    assert wrong.status_code == 401


def test_openai_generate_b64_and_url_and_edit(server: Server) -> None:
    client = _oai(server)
    r = client.images.generate(
        model="dall-e-3", prompt="a seven", n=2, size="32x32", response_format="b64_json"
    )
    assert len(r.data) == 2 and Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))).size == (32, 32)
    r = client.images.generate(model="tiny", prompt="a seven", size="16x16", response_format="url")
    fetched = httpx.get(r.data[0].url)
    assert fetched.status_code == 200 and Image.open(io.BytesIO(fetched.content)).size == (16, 16)
    image, mask = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (8, 8), (200, 200, 200)).save(image, format="PNG")
    m = Image.new("RGBA", (8, 8), (0, 0, 0, 255))
    m.paste((0, 0, 0, 0), (4, 0, 8, 8))
    m.save(mask, format="PNG")
    r = client.images.edit(
        image=("init.png", image.getvalue(), "image/png"),
        mask=("mask.png", mask.getvalue(), "image/png"),
        prompt="3",
        size="8x8",
        response_format="b64_json",
    )
    out = _b64_arr(r.data[0].b64_json)
    assert np.abs(out[:, :4] - 200).max() <= 3 and np.abs(out[:, 4:] - 200).max() > 3


def test_openai_errors_and_auth(server: Server) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        _oai(server).images.generate(prompt="7", size="enormous")
    assert bad.value.status_code == 400 and bad.value.body["param"] == "size"
    nobody = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        nobody.images.generate(prompt="7")
    assert [m.id for m in _oai(server).models.list()] == ["tiny"]


def test_same_seed_through_all_three_apis_gives_the_same_image(server: Server) -> None:
    a1111 = _a1111(server).txt2img(prompt="7", seed=SAME["seed"], steps=SAME["steps"], width=8, height=8)
    oai = _oai(server).images.generate(
        model="tiny",
        prompt="7",
        size="8x8",
        response_format="b64_json",
        extra_body={**SAME, "sampler": "euler", "schedule": "karras"},
    )
    body = {**SAME, "class_label": 7, "sampler": "euler", "schedule": "karras"}
    ours = httpx.post(f"{server.url}/sample", json=body, headers={"Authorization": f"Bearer {KEY}"}).json()
    a = _arr(a1111.image)
    assert np.array_equal(a, _b64_arr(oai.data[0].b64_json)) and np.array_equal(
        a, _b64_arr(ours["images"][0])
    )


def _rows(server: Server) -> tuple[float, float]:
    text = httpx.get(f"{server.url}/metrics").text
    total = sum(float(v) for v in re.findall(r"^kdiff_batch_rows_sum\{[^}]*\} (\S+)$", text, re.M))
    count = sum(float(v) for v in re.findall(r"^kdiff_batch_rows_count\{[^}]*\} (\S+)$", text, re.M))
    return total, count


def test_sixteen_a1111_clients_share_model_calls_and_see_only_their_progress(server: Server) -> None:
    rows0, calls0 = _rows(server)
    clients = [_a1111(server, key=f"sk-c{i}") for i in range(16)]
    steps = [300 + 10 * i for i in range(16)]
    results: list[Any] = [None] * 16

    def call(i: int) -> None:
        results[i] = clients[i].txt2img(prompt=str(i % 10), seed=i, steps=steps[i], width=8, height=8)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    idle, reports = _a1111(server, key="sk-idle"), 0
    while any(t.is_alive() for t in threads):
        for i, api in enumerate(clients):
            state = api.get_progress()["state"]
            assert state["job_count"] <= 1
            if state["job_count"] and state["sampling_steps"]:
                assert state["sampling_steps"] == steps[i]  # its own job, never another client's
                reports += 1
        assert idle.get_progress()["state"]["job_count"] == 0
    for t in threads:
        t.join(60)
    assert all(r is not None and len(r.images) == 1 for r in results)
    assert reports > 0
    rows, calls = _rows(server)
    assert (rows - rows0) / (calls - calls0) > 1.0  # rows per model call: the requests shared calls


def _png(color: tuple[int, ...], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def test_openai_n_none_is_one_image(server: Server) -> None:
    # the client sends "n": null for n=None; OpenAI reads it as 1
    r = _oai(server).images.generate(prompt="7", n=None, size="8x8", response_format="b64_json")
    assert r.data is not None and len(r.data) == 1


def test_openai_edit_of_several_images_edits_the_first(server: Server) -> None:
    mask = io.BytesIO()
    m = Image.new("RGBA", (8, 8), (0, 0, 0, 255))
    m.paste((0, 0, 0, 0), (4, 0, 8, 8))
    m.save(mask, format="PNG")
    r = _oai(server).images.edit(  # sent as two image[] parts; the mask applies to the first
        image=[("a.png", _png((200, 200, 200)), "image/png"), ("b.png", _png((20, 20, 20)), "image/png")],
        mask=("mask.png", mask.getvalue(), "image/png"),
        prompt="3",
        size="8x8",
        response_format="b64_json",
    )
    out = _b64_arr(r.data[0].b64_json)
    assert np.abs(out[:, :4] - 200).max() <= 3


def test_openai_streams_partial_images_then_completed_events(server: Server) -> None:
    # partial images: the first image's prediction at evenly spread steps (12 steps, 2 partials: 4, 8)
    client = _oai(server)
    ask = {"prompt": "7", "n": 2, "size": "16x16", "extra_body": {"steps": 12, "seed": 3}}
    events = list(client.images.generate(**ask, stream=True, partial_images=2))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + [
        "image_generation.completed"
    ] * 2
    partials = [e for e in events if isinstance(e, ImageGenPartialImageEvent)]  # parsed to the client's types
    assert [e.partial_image_index for e in partials] == [0, 1]
    assert all(e.size == "16x16" and e.output_format == "png" and e.background == "opaque" for e in events)
    first, second, final = (_b64_arr(e.b64_json) for e in (*partials, events[2]))
    assert first.shape == final.shape == (16, 16, 3)
    # real intermediate predictions: each differs from the final image and the later one is closer to it
    assert np.abs(first - final).mean() > np.abs(second - final).mean() > 0
    assert events[2].usage.total_tokens == 0
    plain = client.images.generate(**ask, response_format="b64_json")  # the same images as unstreamed
    assert [
        np.array_equal(_b64_arr(e.b64_json), _b64_arr(d.b64_json))
        for e, d in zip(events[2:], plain.data, strict=True)
    ] == [
        True,
        True,
    ]
    edits = list(
        client.images.edit(
            image=("i.png", _png((200, 200, 200)), "image/png"),
            prompt="3",
            stream=True,
            partial_images=1,
            output_format="jpeg",
            extra_body={"steps": 6},
        )
    )
    assert [e.type for e in edits] == ["image_edit.partial_image", "image_edit.completed"]
    assert isinstance(edits[0], ImageEditPartialImageEvent)
    assert all(Image.open(io.BytesIO(base64.b64decode(e.b64_json))).format == "JPEG" for e in edits)
    assert [
        e.type for e in client.images.generate(prompt="7", size="8x8", stream=True, partial_images=3)
    ] == ["image_generation.partial_image"] * 3 + [
        "image_generation.completed"
    ]  # the model's 4 steps: partials after steps 1, 2, 3
    with pytest.raises(openai.BadRequestError):  # refused before the stream starts: a JSON error
        list(client.images.generate(prompt="7", size="enormous", stream=True, partial_images=2))


def test_openai_stream_failing_after_a_partial_image_ends_with_an_error_event(server: Server) -> None:
    # once an event went out the status is sent: a failure is OpenAI's error event, which the client raises
    stream = _oai(server).images.generate(
        prompt="7", size="8x8", stream=True, partial_images=3, extra_body={"steps": 2000}
    )
    first = next(iter(stream))
    assert first.type == "image_generation.partial_image"
    auth = {"Authorization": f"Bearer {KEY}"}
    (running,) = [j for j in httpx.get(f"{server.url}/jobs", headers=auth).json() if j["status"] == "running"]
    assert httpx.delete(f"{server.url}/jobs/{running['id']}", headers=auth).status_code == 200
    with pytest.raises(openai.APIError, match="cancelled"):
        list(stream)


def test_openai_output_formats_compression_and_links(server: Server) -> None:
    client = _oai(server)
    sizes = {}
    for fmt, compression in (("jpeg", 100), ("jpeg", 10), ("webp", 80), ("png", None)):
        r = client.images.generate(
            model="gpt-image-1", prompt="7", size="64x64", output_format=fmt, output_compression=compression
        )
        data = base64.b64decode(r.data[0].b64_json)
        assert Image.open(io.BytesIO(data)).format == fmt.upper() and r.output_format == fmt
        if fmt != "png":  # the generation parameters ride along, as A1111 writes them
            assert "Steps: 4" in image_gate.text_chunks(data, "image")["parameters"]
        sizes[fmt, compression] = len(data)
    assert sizes["jpeg", 10] < sizes["jpeg", 100]
    linked = client.images.generate(prompt="7", size="8x8", output_format="webp", response_format="url")
    url = linked.data[0].url
    assert url.endswith(".webp")
    got = httpx.get(url)
    assert (
        got.headers["content-type"] == "image/webp" and Image.open(io.BytesIO(got.content)).format == "WEBP"
    )
    token = url.rsplit("/", 1)[1].rsplit(".", 1)[0]
    for path in (
        f"{token}.exe",
        f"{token}",
        f"..%2F{token}.png",
        "..%2F..%2Fetc%2Fpasswd.png",
    ):
        assert httpx.get(f"{server.url}/v1/images/files/{path}").status_code == 404
    assert (
        httpx.get(f"{server.url}/v1/images/files/{token}.png").content == got.content
    )  # any extension we make


def test_openai_background_quality_size_auto_and_usage(server: Server) -> None:
    client = _oai(server)
    for background in ("transparent",):
        with pytest.raises(openai.BadRequestError) as bad:
            client.images.generate(prompt="7", size="8x8", background=background, output_format="png")
        assert bad.value.body["param"] == "background" and "opaque" in bad.value.body["message"]
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="7", size="8x8", quality="ultra")  # type: ignore[arg-type]
    assert bad.value.body["param"] == "quality" and "'hd'" in bad.value.body["message"]
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="7", output_format="gif")
    assert bad.value.body["param"] == "output_format"
    r = client.images.generate(model="dall-e-3", prompt="7", size="auto", quality="hd", background="opaque")
    assert r.size == "8x8" and r.quality == "high" and r.background == "opaque" and r.output_format == "png"
    assert r.usage is not None and r.usage.total_tokens == 0 and r.usage.input_tokens_details.text_tokens == 0
    assert client.images.generate(prompt="7", size="8x8", user="u-1").safety_identifier == "u-1"


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the client deprecates variations
def test_openai_variations(server: Server) -> None:
    r = _oai(server).images.create_variation(
        image=("i.png", _png((200, 200, 200)), "image/png"), n=2, size="16x16", response_format="b64_json"
    )
    assert r.data is not None and len(r.data) == 2
    png = base64.b64decode(r.data[0].b64_json)
    assert Image.open(io.BytesIO(png)).size == (16, 16)
    missing = httpx.post(f"{server.url}/v1/images/nope", headers={"Authorization": f"Bearer {KEY}"})
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}


def test_openai_gpt_image_models_answer_b64_only_unless_asked(server: Server) -> None:
    # Open WebUI omits response_format for ^gpt-image models, then fetches any url it is given
    # through an SSRF check that refuses loopback and LAN hosts; OpenAI gives those models b64 only
    client = _oai(server)
    r = client.images.generate(model="gpt-image-1", prompt="a seven", size="16x16")
    assert r.data is not None and r.data[0].b64_json and r.data[0].url is None
    edit = client.images.edit(
        model="gpt-image-1.5", image=("i.png", _png((200, 200, 200)), "image/png"), prompt="3"
    )
    assert edit.data is not None and edit.data[0].b64_json and edit.data[0].url is None
    legacy = client.images.generate(model="dall-e-2", prompt="a seven", size="16x16")
    assert legacy.data is not None and legacy.data[0].b64_json and legacy.data[0].url  # both, as before
    linked = client.images.generate(model="gpt-image-1", prompt="7", size="8x8", response_format="url")
    assert linked.data is not None and linked.data[0].url and linked.data[0].b64_json is None

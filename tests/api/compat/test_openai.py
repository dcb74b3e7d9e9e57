"""OpenAI Images routes in-process: shapes, url links, edits, errors in OpenAI's shape, auth."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator

import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.images import read_parameters
from tests.support.compat import jobs_total, pixels


@pytest.fixture(scope="module")
def oai(make_client: Callable[..., TestClient]) -> Iterator[TestClient]:
    with make_client() as c:
        yield c


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_models_list_and_retrieve(oai: TestClient) -> None:
    body = oai.get("/v1/models").json()
    assert body["object"] == "list" and body["data"][0] == {
        **body["data"][0],
        "id": "tiny",
        "object": "model",
    }
    assert oai.get("/v1/models/tiny").json()["id"] == "tiny"
    missing = oai.get("/v1/models/ghost")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    # the OpenAI names the image routes take (as the default model) are found too
    assert [oai.get(f"/v1/models/{name}").status_code for name in ("dall-e-3", "gpt-image-1.5")] == [200, 200]
    bad = oai.post("/v1/images/generations", json={"prompt": "7", "style": "weird"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "style"


def test_generation_b64_and_url_resized_with_the_same_seed_as_sample(oai: TestClient) -> None:
    body = {"model": "dall-e-3", "prompt": "the digit 7", "n": 2, "size": "16x16", "seed": 5}
    out = oai.post("/v1/images/generations", json=body | {"response_format": "b64_json"}).json()
    assert len(out["data"]) == 2 and "url" not in out["data"][0]
    png = base64.b64decode(out["data"][0]["b64_json"])
    assert Image.open(io.BytesIO(png)).size == (16, 16) and read_parameters(png)["class_label"] == 7
    linked = oai.post("/v1/images/generations", json=body | {"response_format": "url"}).json()
    assert "b64_json" not in linked["data"][0]
    fetched = oai.get(linked["data"][0]["url"])
    assert fetched.status_code == 200 and fetched.content == png
    assert oai.get("/v1/images/files/not-a-token.png").status_code == 404
    native = oai.post(
        "/v1/images/generations", json={**body, "size": "8x8", "steps": 4, "sampler": "euler"}
    ).json()
    ours = oai.post("/sample", json={"class_label": 7, "steps": 4, "sampler": "euler", "seed": 5}).json()
    assert np.array_equal(pixels(native["data"][0]["b64_json"]), pixels(ours["images"][0]))


def test_edit_with_a_transparent_mask_repaints_only_there(oai: TestClient) -> None:
    image = _png(Image.new("RGB", (8, 8), (200, 200, 200)))
    mask = Image.new("RGBA", (8, 8), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (4, 0, 8, 8))
    files = {"image": ("i.png", image, "image/png"), "mask": ("m.png", _png(mask), "image/png")}
    data = {"prompt": "3", "size": "8x8", "response_format": "b64_json", "seed": "1"}
    r = oai.post("/v1/images/edits", data=data, files=files)
    assert r.status_code == 200, r.text
    out = pixels(r.json()["data"][0]["b64_json"])
    assert np.abs(out[:, :4] - 200).max() <= 3 and np.abs(out[:, 4:] - 200).max() > 3
    plain = oai.post("/v1/images/edits", data=data, files={"image": files["image"]})
    assert (
        plain.status_code == 200
        and read_parameters(base64.b64decode(plain.json()["data"][0]["b64_json"]))["img2img"]
    )


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt": "7", "size": "big"}, 400, "size"),
        ({"prompt": "7", "size": "0x512"}, 400, "size"),
        ({"prompt": "7", "n": "two"}, 400, "n"),
        ({"prompt": "7", "response_format": "jpeg"}, 400, "response_format"),
        ({"size": "8x8"}, 400, "prompt"),
        ({"prompt": "7", "model": "ghost"}, 404, "model"),
        ({"prompt": "7", "sampler": "warp"}, 400, "sampler"),
    ],
)
def test_bad_generation_requests_get_openai_errors(
    oai: TestClient, body: dict, status: int, param: str
) -> None:
    before = jobs_total(oai.get("/metrics").text)
    r = oai.post("/v1/images/generations", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    assert err["type"] == "invalid_request_error"
    assert jobs_total(oai.get("/metrics").text) == before


def test_edit_without_image_and_bearer_auth(make_client: Callable[..., TestClient]) -> None:
    with make_client(api_keys="k1") as c:
        r = c.post("/v1/images/generations", json={"prompt": "7"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        ok = {"Authorization": "Bearer k1"}
        assert c.get("/v1/models", headers=ok).status_code == 200
        r = c.post("/v1/images/edits", data={"prompt": "7"}, headers=ok)
        assert r.status_code == 400 and r.json()["error"]["param"] == "image"
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "7"})
        assert r.status_code == 401 and r.json()["error"] == "HTTPException"


def test_edit_sent_as_json_is_told_to_send_multipart(oai: TestClient) -> None:
    r = oai.post("/v1/images/edits", json={"prompt": "7", "image": "aGVsbG8="})
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]


def test_unknown_v1_paths_and_methods_answer_in_openai_shape(oai: TestClient) -> None:
    r = oai.post("/v1/images/nope", json={})
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    assert "/v1/images/nope" in r.json()["error"]["message"]
    r = oai.get("/v1/images/generations")
    assert r.status_code == 405 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert oai.get("/not-a-route").json() == {"detail": "Not Found"}  # our own routes keep FastAPI's


def test_variation_is_an_img2img_without_prompt(oai: TestClient) -> None:
    image = _png(Image.new("RGB", (8, 8), (200, 200, 200)))
    data = {"size": "8x8", "response_format": "b64_json", "seed": "1"}
    r = oai.post("/v1/images/variations", data=data, files={"image": ("i.png", image, "image/png")})
    assert r.status_code == 200, r.text
    params = read_parameters(base64.b64decode(r.json()["data"][0]["b64_json"]))
    assert params["img2img"] and params.get("class_label") is None and params["denoise"] == 0.75
    r = oai.post("/v1/images/variations", data=data)
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"


def test_a_partial_image_that_fails_to_decode_fails_no_stream(
    oai: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a preview's VAE decode running out of memory skips that partial image; the images still come
    def out_of_memory(*_: object) -> None:
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr("service.api.compat.openai_stream.decode_full", out_of_memory)
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=oai, max_retries=0)
    events = list(client.images.generate(prompt="7", size="8x8", stream=True, partial_images=2))
    assert [e.type for e in events] == ["image_generation.completed"]


def test_edit_as_json_with_data_urls(oai: TestClient) -> None:
    # OpenAI's reference also takes edits as JSON: images [{image_url}] and mask {image_url}
    image = Image.new("L", (8, 8), 200)
    mask = Image.new("RGBA", (8, 8), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (4, 0, 8, 8))
    url = "data:image/png;base64," + base64.b64encode(_png(image)).decode()
    murl = "data:image/png;base64," + base64.b64encode(_png(mask)).decode()
    body = {"prompt": "3", "images": [{"image_url": url}], "mask": {"image_url": murl}, "size": "8x8"}
    r = oai.post("/v1/images/edits", json=body | {"response_format": "b64_json", "seed": 1})
    assert r.status_code == 200, r.text
    out = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))))
    assert np.abs(out[:, :4].astype(int) - 200).max() <= 3  # kept where the mask is opaque
    refused = {
        "url": ({**body, "images": [{"image_url": "http://169.254.169.254/x"}]}, "images[0].image_url"),
        "file": ({**body, "images": [{"file_id": "file-abc"}]}, "images[0].file_id"),
        "none": ({"prompt": "3"}, "images"),
        "bad": ({**body, "images": [{"image_url": "data:image/png;base64,!!!"}]}, "images[0].image_url"),
    }
    for body_, param in refused.values():
        r = oai.post("/v1/images/edits", json=body_)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text

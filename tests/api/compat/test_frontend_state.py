"""What the frontends keep per caller, and /metrics labels, stay bounded whatever callers send
(issue 23 item 5): /sdapi/v1/options, OpenAI image links, the HTTP request counter."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from service.api.compat.a1111_options import KNOWN, MAX_UNKNOWN, MAX_UNKNOWN_BYTES, OptionsStore
from service.api.compat.image_links import ImageLinks
from service.api.metrics_labels import METHODS

KEYS = ["key-a", "key-b"]
A, B = ({"Authorization": f"Bearer {k}"} for k in KEYS)


@pytest.fixture(scope="module")
def keyed(make_client: Callable[..., TestClient]) -> Iterator[TestClient]:
    with make_client(api_keys=",".join(KEYS), max_images=16) as c:
        yield c


@pytest.fixture(scope="module")
def open_client(make_client: Callable[..., TestClient]) -> Iterator[TestClient]:
    with make_client() as c:
        yield c


# --- /sdapi/v1/options


def test_the_issues_four_16_mib_values_are_refused_and_nothing_is_kept(keyed: TestClient) -> None:
    big = "x" * 16 * 2**20
    for i in range(4):
        r = keyed.post("/sdapi/v1/options", json={f"big{i}": big}, headers=A)
        assert r.status_code == 422 and r.json()["error"] == "FieldError", r.text[:300]
    got = keyed.get("/sdapi/v1/options", headers=A)
    assert got.status_code == 200 and len(got.content) < 4096


def test_unknown_options_are_bounded_in_count_and_bytes(keyed: TestClient) -> None:
    ok = {f"u{i}": i for i in range(MAX_UNKNOWN)}
    assert keyed.post("/sdapi/v1/options", json=ok, headers=B).status_code == 200
    assert keyed.get("/sdapi/v1/options", headers=B).json()["u7"] == 7  # kept, read back
    r = keyed.post("/sdapi/v1/options", json={"one_more": 1}, headers=B)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "options"]
    r = keyed.post("/sdapi/v1/options", json={"u0": "y" * MAX_UNKNOWN_BYTES}, headers=B)
    assert r.status_code == 422  # replacing a value counts its new size
    assert keyed.get("/sdapi/v1/options", headers=B).json()["u0"] == 0  # all or nothing


def test_a_deeply_nested_value_is_a_422_and_later_gets_still_work(keyed: TestClient) -> None:
    deep = "[" * 400 + "]" * 400
    json_a = {**A, "Content-Type": "application/json"}
    r = keyed.post("/sdapi/v1/options", content='{"x": ' + deep + "}", headers=json_a)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "x"]
    assert keyed.get("/sdapi/v1/options", headers=A).status_code == 200


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CLIP_stop_at_last_layers", "abc"),
        ("CLIP_stop_at_last_layers", 13),
        ("CLIP_stop_at_last_layers", True),
        ("CLIP_stop_at_last_layers", [1]),
        ("sd_model_checkpoint", {"a": 1}),
        ("sd_vae", 5),
        ("eta_noise_seed_delta", -1),
        ("samples_format", "x" * 600),
    ],
)
def test_known_options_are_typed(keyed: TestClient, name: str, value: object) -> None:
    assert name in KNOWN
    r = keyed.post("/sdapi/v1/options", json={name: value}, headers=A)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", name], r.text


def test_known_options_are_kept_per_key_and_read_by_requests(keyed: TestClient) -> None:
    assert (
        keyed.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2.0}, headers=A).status_code == 200
    )
    assert keyed.get("/sdapi/v1/options", headers=A).json()["CLIP_stop_at_last_layers"] == 2
    assert keyed.get("/sdapi/v1/options", headers=B).json()["CLIP_stop_at_last_layers"] == 1
    r = keyed.post(
        "/sdapi/v1/txt2img", json={"prompt": "a 7", "steps": 1, "width": 8, "height": 8}, headers=A
    )
    assert json.loads(r.json()["info"])["clip_skip"] == 2


def test_callers_are_kept_least_recently_used_first() -> None:
    store = OptionsStore(max_callers=3)
    for i in range(5):
        store.update(f"c{i}", {"CLIP_stop_at_last_layers": 2})
    assert len(store) == 3 and store.get("c0") == {} and store.get("c4") == {"CLIP_stop_at_last_layers": 2}
    store.get("c2")  # used: c3 is now the oldest
    store.update("c5", {"sd_vae": "x"})
    assert store.get("c3") == {} and store.get("c2") != {}


def test_many_authorization_headers_without_keys_keep_a_bounded_store(open_client: TestClient) -> None:
    open_client.get("/sdapi/v1/options")  # the compat state is made on first use
    store = open_client.app.state.compat.options  # type: ignore[attr-defined]
    store.max_callers = 50
    for i in range(120):
        h = {"Authorization": f"Bearer made-up-{i}"}
        assert open_client.post("/sdapi/v1/options", json={"x": i}, headers=h).status_code == 200
    assert len(store) == 50


# --- OpenAI image links


def test_one_keys_links_cannot_expire_anothers(keyed: TestClient) -> None:
    """The issue's case: key B's 33 requests of n=16 (528 links, over the 512 a key keeps) leave
    key A's link alive."""
    body = {"prompt": "a 7", "steps": 1, "response_format": "url"}
    mine = keyed.post("/v1/images/generations", json=body, headers=A).json()["data"][0]["url"]
    path = mine.split("testserver", 1)[-1]
    for _ in range(33):
        r = keyed.post("/v1/images/generations", json={**body, "n": 16}, headers=B)
        assert r.status_code == 200, r.text[:200]
    assert keyed.get(path).status_code == 200
    links: ImageLinks = keyed.app.state.image_links  # type: ignore[attr-defined]
    assert links.count(None) == 0 and links.max_images == 512


def test_links_are_bounded_per_owner() -> None:
    links = ImageLinks(max_images=3, max_bytes=10)
    a = links.put(b"aa", "A")
    tokens_b = [links.put(b"b", "B") for _ in range(10)]
    assert links.get(a) == b"aa" and links.count("B") == 3 and links.get(tokens_b[0]) is None
    big = links.put(b"c" * 9, "A")  # A's own bytes bound drops A's oldest
    assert links.get(a) is None and links.get(big) is not None and links.get(tokens_b[-1]) == b"b"


def test_links_expire_after_their_ttl() -> None:
    links = ImageLinks(ttl_s=0.0)
    token = links.put(b"x", "A")
    assert links.get(token) is None and links.count("A") == 0


# --- /metrics


def _series(client: TestClient) -> set[str]:
    """The label sets of the request counter."""
    lines = client.get("/metrics").text.splitlines()
    prefix = "kdiff_http_requests_total{"
    return {line[len(prefix) : line.rindex("}")] for line in lines if line.startswith(prefix)}


def _made_up(client: TestClient, start: int) -> None:
    for i in range(start, start + 150):
        client.request(f"M{i}THOD", "/healthz")
        client.request(f"M{i}THOD", f"/no/such/{i}")
        client.get(f"/no/such/path/{i}")
        client.get(f"/jobs/made-up-{i}")


def test_made_up_methods_and_paths_add_no_label_values(open_client: TestClient) -> None:
    """The issue's case: 150 requests with made-up methods grew /metrics from 26 to 636 KiB."""
    _made_up(open_client, 0)
    open_client.get("/metrics")
    before, size = _series(open_client), len(open_client.get("/metrics").content)
    _made_up(open_client, 1000)
    assert _series(open_client) == before
    assert len(open_client.get("/metrics").content) < size + 1024  # counts grow, not series
    text = " ".join(before)
    assert 'method="other"' in text and "THOD" not in text and "made-up" not in text, text
    assert "/no/such" not in text and 'route="unmatched"' in text, text
    assert 'route="/jobs/{job_id}"' in text, text
    methods = {labels.split('method="', 1)[1].split('"', 1)[0] for labels in before}
    assert methods <= METHODS | {"other"}

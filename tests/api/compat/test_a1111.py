"""A1111 routes (/sdapi/v1) in-process: shapes, translation, seeds, per-caller state, errors."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.images import read_parameters
from tests.support.compat import info, jobs_total, pixels, png_b64

BASE = {"prompt": "a 7", "steps": 4, "sampler_name": "Euler", "scheduler": "Karras", "seed": 5}


@pytest.fixture(scope="module")
def a1111(make_client: Callable[..., TestClient]) -> Iterator[TestClient]:
    with make_client(max_steps=10_000) as c:
        yield c


@pytest.mark.parametrize(
    ("path", "check"),
    [
        (
            "sd-models",
            lambda r: r[0]["title"] == "tiny" and {"model_name", "hash", "filename"} <= r[0].keys(),
        ),
        ("samplers", lambda r: {"DPM++ 2M", "Euler a"} <= {s["name"] for s in r} and "aliases" in r[0]),
        ("schedulers", lambda r: {"automatic", "karras"} <= {s["name"] for s in r} and "label" in r[0]),
        ("upscalers", lambda r: r[0]["name"] == "None"),
        ("latent-upscale-modes", lambda r: [m["name"] for m in r][:2] == ["Latent", "Latent (antialiased)"]),
        ("sd-vae", lambda r: r == []),
        ("sd-modules", lambda r: r == []),
        ("loras", lambda r: r == []),
        ("embeddings", lambda r: r == {"loaded": {}, "skipped": {}}),
        ("cmd-flags", lambda r: r["api"] is True),
        ("memory", lambda r: "ram" in r and "cuda" in r),
        ("progress", lambda r: r["progress"] == 0 and r["state"]["job_count"] == 0),
        ("options", lambda r: r["sd_model_checkpoint"] == "tiny"),
    ],
)
def test_listing_routes_have_a1111_shapes(a1111: TestClient, path: str, check: Callable[[Any], bool]) -> None:
    r = a1111.get(f"/sdapi/v1/{path}")
    assert r.status_code == 200 and check(r.json()), r.text


def test_post_only_routes_answer_null(a1111: TestClient) -> None:
    for path in ("refresh-checkpoints", "interrupt", "skip"):
        r = a1111.post(f"/sdapi/v1/{path}")
        assert r.status_code == 200 and r.json() is None, (path, r.text)


def test_txt2img_batches_seeds_resize_and_infotext(a1111: TestClient) -> None:
    body = {
        **BASE,
        "batch_size": 2,
        "n_iter": 2,
        "width": 32,
        "height": 24,
        "enable_hr": True,
        "unknown": [1],
    }
    r = a1111.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    meta = info(out)
    assert meta["all_seeds"] == [5, 6, 7, 8] and meta["seed"] == 5 and len(out["images"]) == 4
    # a fixed-size model runs no hires pass: its image is resized to the hires size (2x), and it says so
    assert pixels(out["images"][0]).shape == (48, 64, 3)
    assert any("resized to 32x24" in c for c in meta["comments"])
    assert any("hires fix not run" in c for c in meta["comments"])
    assert meta["infotexts"][1].startswith(
        "a 7\nSteps: 4, Sampler: Euler, Schedule type: Karras, CFG scale: 1"
    )
    assert "Seed: 6, Size: 32x24, Model: tiny" in meta["infotexts"][1]
    assert out["parameters"]["prompt"] == "a 7"
    pinfo = a1111.post("/sdapi/v1/png-info", json={"image": out["images"][2]}).json()
    assert pinfo["info"] == meta["infotexts"][2] and pinfo["parameters"]["Seed"] == "7"
    assert '"class_label": 7' in pinfo["items"]["kdiff"]


def test_random_seed_is_reported_and_reproduces(a1111: TestClient) -> None:
    first = a1111.post("/sdapi/v1/txt2img", json={**BASE, "seed": -1, "width": 8, "height": 8}).json()
    seed = info(first)["seed"]
    assert seed >= 0
    again = a1111.post("/sdapi/v1/txt2img", json={**BASE, "seed": seed, "width": 8, "height": 8}).json()
    assert np.array_equal(pixels(first["images"][0]), pixels(again["images"][0]))


def test_same_seed_as_sample_and_digit_words(a1111: TestClient) -> None:
    ours = a1111.post(
        "/sample", json={"class_label": 7, "steps": 4, "sampler": "euler", "schedule": "karras", "seed": 5}
    ).json()
    theirs = a1111.post("/sdapi/v1/txt2img", json={**BASE, "width": 8, "height": 8}).json()
    word = a1111.post("/sdapi/v1/txt2img", json={**BASE, "prompt": "seven", "width": 8, "height": 8}).json()
    other = a1111.post("/sdapi/v1/txt2img", json={**BASE, "prompt": "three", "width": 8, "height": 8}).json()
    a = pixels(ours["images"][0])
    assert np.array_equal(a, pixels(theirs["images"][0])) and np.array_equal(a, pixels(word["images"][0]))
    assert read_parameters(base64.b64decode(other["images"][0]))["class_label"] == 3


def test_variation_seed_slerps_between_the_two_noises(a1111: TestClient) -> None:
    def image(**extra: Any) -> np.ndarray:
        r = a1111.post("/sdapi/v1/txt2img", json={**BASE, "width": 8, "height": 8, **extra})
        assert r.status_code == 200, r.text
        return pixels(r.json()["images"][0])

    plain, other = image(), image(seed=99)
    assert np.array_equal(image(subseed=99, subseed_strength=0.0), plain)
    assert np.array_equal(image(subseed=99, subseed_strength=1.0), other)  # euler: start noise only
    half = image(subseed=99, subseed_strength=0.5)
    assert not np.array_equal(half, plain) and not np.array_equal(half, other)
    r = a1111.post("/sdapi/v1/txt2img", json={**BASE, "subseed": 99, "subseed_strength": 0.5})
    assert info(r.json())["all_subseeds"] == [99] and "Variation seed: 99" in info(r.json())["infotexts"][0]


def test_img2img_with_mask_keeps_the_unmasked_part(a1111: TestClient) -> None:
    init = np.full((8, 8, 3), 200)
    mask = np.zeros((8, 8, 3))
    mask[:, 4:] = 255
    body = {**BASE, "init_images": [png_b64(init)], "mask": png_b64(mask), "denoising_strength": 0.9}
    body |= {"width": 8, "height": 8, "mask_blur": 0}
    r = a1111.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    out = pixels(r.json()["images"][0])
    assert np.abs(out[:, :4] - 200).max() <= 3  # kept
    assert np.abs(out[:, 4:] - 200).max() > 3  # repainted
    inverted = pixels(
        a1111.post("/sdapi/v1/img2img", json={**body, "inpainting_mask_invert": 1}).json()["images"][0]
    )
    assert np.abs(inverted[:, 4:] - 200).max() <= 3 and r.json()["parameters"]["init_images"] is None
    plain = a1111.post("/sdapi/v1/img2img", json={**body, "mask": None})
    assert plain.status_code == 200 and "inpaint" not in " ".join(info(plain.json())["comments"])


def test_nulls_read_as_a1111_reads_them(a1111: TestClient) -> None:
    """Every processing field of A1111's API model is Optional: a null seed is random, a null flag is
    false (send_images too: A1111's ``args.pop("send_images", True)`` gives None), other ints default."""
    nulls = dict.fromkeys(("seed", "subseed", "enable_hr", "save_images"))
    r = a1111.post("/sdapi/v1/txt2img", json={**BASE, **nulls})
    assert r.status_code == 200 and len(r.json()["images"]) == 1, r.text
    assert info(r.json())["seed"] >= 0
    r = a1111.post("/sdapi/v1/txt2img", json={**BASE, "send_images": None})
    assert r.status_code == 200 and r.json()["images"] == [], r.text
    img2img = dict.fromkeys(
        (
            "mask_blur",
            "resize_mode",
            "inpainting_fill",
            "inpaint_full_res",
            "inpaint_full_res_padding",
            "inpainting_mask_invert",
            "include_init_images",
        )
    )
    mask = np.zeros((8, 8, 3))
    mask[:, 4:] = 255
    body = {**BASE, "init_images": [png_b64(np.full((8, 8, 3), 200))], "mask": png_b64(mask), **img2img}
    r = a1111.post("/sdapi/v1/img2img", json={**body, "width": 8, "height": 8})
    assert r.status_code == 200 and len(r.json()["images"]) == 1, r.text


def test_mask_blur_per_axis_as_a1111_reads_it() -> None:
    """``mask_blur``, when given, sets both axes; else ``mask_blur_x`` / ``mask_blur_y``, 4 each."""
    from service.api.compat.a1111_schemas import Img2ImgRequest
    from service.api.compat.a1111_translate import _mask

    mask = np.zeros((16, 16, 3))
    mask[8:] = 255  # a horizontal edge: only a vertical (y) blur changes it

    def blurred(**blur: int) -> np.ndarray:
        body = Img2ImgRequest(init_images=[], mask=png_b64(mask), **blur)
        return np.asarray(_mask(body, (16, 16)).image)

    sharp = blurred(mask_blur=0)
    assert np.array_equal(blurred(mask_blur=0, mask_blur_x=4, mask_blur_y=4), sharp)
    assert np.array_equal(blurred(mask_blur_x=6, mask_blur_y=0), sharp)
    assert not np.array_equal(blurred(mask_blur_x=0, mask_blur_y=6), sharp)
    assert np.array_equal(blurred(), blurred(mask_blur=4)) and not np.array_equal(blurred(), sharp)


def test_an_opaque_rgba_mask_is_read_as_its_picture(a1111: TestClient) -> None:
    """create_binary_mask: the alpha is the mask only where it is not opaque everywhere; an opaque
    RGBA mask is its picture (white = repaint), as the same mask sent as L."""
    init = np.full((8, 8, 3), 200)
    picture = np.zeros((8, 8, 3))
    picture[:, 4:] = 255
    rgba = np.concatenate([picture, np.full((8, 8, 1), 255)], axis=2)
    body = {**BASE, "init_images": [png_b64(init)], "denoising_strength": 0.9, "width": 8, "height": 8}
    body |= {"mask_blur": 0, "initial_noise_multiplier": 0.5}
    as_l = a1111.post("/sdapi/v1/img2img", json={**body, "mask": png_b64(picture)}).json()
    as_rgba = a1111.post("/sdapi/v1/img2img", json={**body, "mask": png_b64(rgba)}).json()
    assert np.array_equal(pixels(as_l["images"][0]), pixels(as_rgba["images"][0]))
    assert "Noise multiplier: 0.5" in info(as_l)["infotexts"][0]


def test_hr_scale_is_read_only_with_hires_on(a1111: TestClient) -> None:
    r = a1111.post("/sdapi/v1/txt2img", json={**BASE, "enable_hr": False, "hr_scale": 0})
    assert r.status_code == 200, r.text
    r = a1111.post("/sdapi/v1/txt2img", json={**BASE, "enable_hr": True, "hr_scale": 0})
    assert r.status_code == 422 and "hr_scale" in r.text, r.text


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"steps": "many"}, "steps"),
        ({"seed": "x"}, "seed"),
        ({"batch_size": [1]}, "batch_size"),
        ({"width": -5}, "width"),
        ({"sampler_name": "Warp Drive"}, "sampler_name"),
        ({"scheduler": "Sideways"}, "scheduler"),
        ({"override_settings": {"sd_model_checkpoint": "nope"}}, "sd_model_checkpoint"),
        ({"subseed_strength": 2}, "subseed_strength"),
    ],
)
def test_bad_input_is_422_in_a1111_shape_and_runs_nothing(a1111: TestClient, body: dict, field: str) -> None:
    before = jobs_total(a1111.get("/metrics").text)
    r = a1111.post("/sdapi/v1/txt2img", json={**BASE, **body})
    assert r.status_code == 422, r.text
    out = r.json()
    assert (
        out["error"] in ("RequestValidationError", "FieldError")
        and {"detail", "body", "errors"} <= out.keys()
    )
    assert out["detail"][0]["loc"][-1] == field
    assert jobs_total(a1111.get("/metrics").text) == before
    assert a1111.post("/sdapi/v1/img2img", json={**BASE, "denoising_strength": 0.5}).status_code == 422


def test_options_are_per_caller(a1111: TestClient) -> None:
    alice, bob = {"Authorization": "Bearer alice"}, {"Authorization": "Bearer bob"}
    r = a1111.post(
        "/sdapi/v1/options",
        json={"CLIP_stop_at_last_layers": 2, "sd_model_checkpoint": "tiny"},
        headers=alice,
    )
    assert r.status_code == 200 and r.json() is None
    assert a1111.get("/sdapi/v1/options", headers=alice).json()["CLIP_stop_at_last_layers"] == 2
    assert a1111.get("/sdapi/v1/options", headers=bob).json()["CLIP_stop_at_last_layers"] == 1
    bad = a1111.post("/sdapi/v1/options", json={"sd_model_checkpoint": "ghost"}, headers=alice)
    assert bad.status_code == 422 and bad.json()["error"] == "FieldError"


def _wait_running(client: TestClient, headers: dict[str, str], timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = client.get("/sdapi/v1/progress", headers=headers).json()
        # progress is rounded to 4 places: the first steps of 10,000 read 0.0 until a few are done
        if p["state"]["job_count"] and p["state"]["sampling_step"] > 0 and p["progress"] > 0:
            return p
        time.sleep(0.02)
    raise AssertionError("the job never ran")


def test_progress_and_interrupt_touch_only_the_callers_jobs(a1111: TestClient) -> None:
    alice, bob = {"Authorization": "Bearer alice"}, {"Authorization": "Bearer bob"}
    result: dict[str, Any] = {}

    def long_call() -> None:
        body = {**BASE, "steps": 10_000, "width": 8, "height": 8}
        result["r"] = a1111.post("/sdapi/v1/txt2img", json=body, headers=alice)

    t = threading.Thread(target=long_call)
    t.start()
    try:
        p = _wait_running(a1111, alice)
        assert 0 < p["progress"] < 1 and p["state"]["sampling_steps"] == 10_000
        assert p["current_image"] is not None  # a pixel-space model's preview is cheap
        assert a1111.get("/sdapi/v1/progress", headers=bob).json()["state"]["job_count"] == 0
        a1111.post("/sdapi/v1/interrupt", headers=bob)  # not bob's job: nothing happens
        time.sleep(0.1)
        assert a1111.get("/sdapi/v1/progress", headers=alice).json()["state"]["job_count"] == 1
        a1111.post("/sdapi/v1/interrupt", headers=alice)
        t.join(10)
    finally:
        if t.is_alive():
            a1111.post("/sdapi/v1/interrupt", headers=alice)
            t.join(10)
    r = result["r"]
    # as A1111: the images as they stood (each one's latest denoised prediction), interrupted: true
    assert r.status_code == 200 and len(r.json()["images"]) == 1 and info(r.json())["interrupted"] is True


def test_png_info_reads_an_a1111_png(a1111: TestClient) -> None:
    import io

    from PIL import Image, PngImagePlugin

    text = (
        "a cat, (fluffy:1.2)\nNegative prompt: dog\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, "
        'CFG scale: 7, Seed: 1, Size: 512x512, Model: "x, y"'
    )
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", text)
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG", pnginfo=meta)
    r = a1111.post("/sdapi/v1/png-info", json={"image": base64.b64encode(buf.getvalue()).decode()})
    p = r.json()["parameters"]
    assert p["Prompt"] == "a cat, (fluffy:1.2)" and p["Negative prompt"] == "dog"
    assert p["Sampler"] == "DPM++ 2M" and p["Size-1"] == "512" and p["Model"] == "x, y"
    assert a1111.post("/sdapi/v1/png-info", json={"image": "not base64!"}).status_code == 422


def test_progress_counts_a_requests_done_batches_as_a1111(a1111: TestClient) -> None:
    """A1111's /progress over one request of n_iter batches: job_count stays n_iter and job_no moves
    on as batches finish (or are skipped), progress = (job_no + step fraction) / job_count, so it
    never falls back when a batch ends (it did: only unfinished batches were counted)."""
    carol = {"Authorization": "Bearer carol"}
    result: dict[str, Any] = {}

    def long_call() -> None:
        body = {**BASE, "steps": 10_000, "width": 8, "height": 8, "n_iter": 2}
        result["r"] = a1111.post("/sdapi/v1/txt2img", json=body, headers=carol)

    t = threading.Thread(target=long_call)
    t.start()
    try:
        before = _wait_running(a1111, carol)
        assert before["state"]["job_count"] == 2 and before["state"]["job_no"] == 0
        a1111.post("/sdapi/v1/skip", headers=carol)  # the first batch ends; the second goes on
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            after = a1111.get("/sdapi/v1/progress", headers=carol).json()
            if after["state"]["job_no"] == 1:
                break
            time.sleep(0.02)
        assert after["state"]["job_count"] == 2 and after["state"]["job_no"] == 1, after["state"]
        assert after["progress"] >= 0.5 and after["progress"] >= before["progress"], after
        assert after["state"]["job"] == "Batch 2 out of 2"
        a1111.post("/sdapi/v1/interrupt", headers=carol)
        t.join(10)
    finally:
        if t.is_alive():
            a1111.post("/sdapi/v1/interrupt", headers=carol)
            t.join(10)
    assert result["r"].status_code == 200 and info(result["r"].json())["interrupted"] is True

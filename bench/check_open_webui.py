"""Drive the REAL Open WebUI (its ``comfyui`` image engine) against our ComfyUI API and check the
images it returns are the ones our server made. Manual: run through bench/check_open_webui.sh, which
starts both servers (Open WebUI from its own venv, never a project dependency).

Steps: sign up Open WebUI's first user (the admin) -> POST /api/v1/images/generations -> fetch each
returned file from Open WebUI -> compare its pixels with our /history + /view for the same prompt;
then POST /api/v1/images/edit (a data-URL image: Open WebUI uploads it to our /api/upload/image and
runs the admin's edit workflow) and compare the same way. Exit status 0 only if all of it held."""

from __future__ import annotations

import argparse
import base64
import io
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
from PIL import Image


def pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as img:
        return np.asarray(img.convert("RGB"))


def our_images(kdiff: str, key: str) -> list[np.ndarray]:
    """Every image in our /history (all prompts), fetched through /view."""
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    out = []
    for entry in httpx.get(f"{kdiff}/history", headers=auth, timeout=30).json().values():
        for node in entry["outputs"].values():
            for img in node.get("images", []):
                r = httpx.get(f"{kdiff}/view", params=img, headers=auth, timeout=30)
                out.append(pixels(r.content))
    return out


def check_files(
    owui: str, token: str, files: list[dict[str, Any]], ours: list[np.ndarray], what: str
) -> None:
    assert files, f"{what}: Open WebUI returned no image"
    for f in files:
        r = httpx.get(f"{owui}{f['url']}", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code == 200 and r.headers["content-type"].startswith("image/"), (
            r.status_code,
            r.headers,
        )
        got = pixels(r.content)
        assert any(got.shape == o.shape and np.array_equal(got, o) for o in ours), f"{what}: not one of ours"
        print(
            f"{what}: {f['url']} {r.headers['content-type']} {got.shape[1]}x{got.shape[0]} = our /view image"
        )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--owui", required=True)
    ap.add_argument("--kdiff", required=True)
    ap.add_argument("--key", default="", help="our API key (Open WebUI's COMFYUI_API_KEY)")
    ap.add_argument("--size", default="512x512", help="Open WebUI's size field")
    args = ap.parse_args()
    owui, kdiff = args.owui, args.kdiff
    r = httpx.post(
        f"{owui}/api/v1/auths/signup",
        json={"name": "admin", "email": "admin@example.com", "password": "check-open-webui"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    token = r.json()["token"]
    auth = {"Authorization": f"Bearer {token}"}
    cfg = httpx.get(f"{owui}/api/v1/images/config", headers=auth, timeout=30).json()
    print(
        "Open WebUI images config:", {k: v for k, v in cfg.items() if "COMFYUI" in k and "WORKFLOW" not in k}
    )
    # the admin page's "verify connection" button: GET our /object_info with the key
    verify = {"engine": "comfyui", "url": kdiff, "key": args.key}
    r = httpx.post(f"{owui}/api/v1/images/verify", json=verify, headers=auth, timeout=60)
    print("POST /api/v1/images/verify ->", r.status_code, r.text[:100])
    assert r.status_code == 200 and r.json() is True, r.text
    if args.key:  # a wrong key is refused by us, which Open WebUI reports as a bad URL
        r = httpx.post(f"{owui}/api/v1/images/verify", json={**verify, "key": "wrong"}, headers=auth)
        print("POST /api/v1/images/verify (wrong key) ->", r.status_code, r.text[:100])
        assert r.status_code == 400, r.text
    models = httpx.get(f"{owui}/api/v1/images/models", headers=auth, timeout=60).json()
    print("Open WebUI's image models (from our /object_info):", models)

    body = {"prompt": "a handwritten 7", "n": 2, "size": args.size, "steps": 6}
    r = httpx.post(f"{owui}/api/v1/images/generations", json=body, headers=auth, timeout=300)
    print("POST /api/v1/images/generations", body, "->", r.status_code, r.text[:300])
    assert r.status_code == 200, r.text
    gen = r.json()
    assert len(gen) == 2, gen
    check_files(owui, token, gen, our_images(kdiff, args.key), "generation")

    # several users at once: each request opens its own socket (its own clientId) on our server
    with ThreadPoolExecutor(3) as pool:
        jobs = [
            pool.submit(httpx.post, f"{owui}/api/v1/images/generations", json=b, headers=auth, timeout=300)
            for b in ({**body, "n": 1, "prompt": str(d)} for d in range(3))
        ]
        together = [j.result() for j in jobs]
    print("3 concurrent generations ->", [r.status_code for r in together])
    assert all(r.status_code == 200 and len(r.json()) == 1 for r in together), [r.text for r in together]
    files = [r.json()[0] for r in together]
    check_files(owui, token, files, our_images(kdiff, args.key), "concurrent generation")
    got = [httpx.get(f"{owui}{f['url']}", headers=auth, timeout=30).content for f in files]
    assert len({pixels(g).tobytes() for g in got}) == 3, "two concurrent requests got the same image"

    # the edit flow: one of the generated images back as a data URL
    src = httpx.get(f"{owui}{gen[0]['url']}", headers=auth, timeout=30).content
    data_url = "data:image/png;base64," + base64.b64encode(src).decode()
    r = httpx.post(
        f"{owui}/api/v1/images/edit",
        json={"image": data_url, "prompt": "make it a 3"},
        headers=auth,
        timeout=300,
    )
    print("POST /api/v1/images/edit {image: <data URL>, prompt} ->", r.status_code, r.text[:300])
    assert r.status_code == 200, r.text
    edited = r.json()
    check_files(owui, token, edited, our_images(kdiff, args.key), "edit")
    out = httpx.get(f"{owui}{edited[0]['url']}", headers=auth, timeout=30).content
    assert not np.array_equal(pixels(out), pixels(src)), "edit: the image came back unchanged"
    hist = httpx.get(f"{kdiff}/history", headers={"Authorization": f"Bearer {args.key}"} if args.key else {})
    print(f"our /history holds {len(hist.json())} prompts; all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

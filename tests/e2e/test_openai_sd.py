"""The OpenAI image routes on a Stable Diffusion model, with the official ``openai`` client against a
live server (the tiny random-weight SD 1.x ``sd1``: 64x64 by default, at most 128 a side; and the
fixed-size ``digits``)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import openai
import pytest
from PIL import Image

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")

from tests.support.sd_tiny import frontend_server  # noqa: E402

FAST = {"steps": 2, "seed": 3}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    with frontend_server(tmp_path_factory) as srv:
        yield openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=60)


def _png(size: tuple[int, int]) -> tuple[str, bytes, str]:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 60, 200)).save(buf, format="PNG")
    return ("i.png", buf.getvalue(), "image/png")


def _size(r: Any) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))).size  # type: ignore[no-any-return]


def _edit(client: openai.OpenAI, model: str, image: tuple[int, int], **size: Any) -> Any:
    return client.images.edit(
        model=model, image=_png(image), prompt="a red 3", response_format="b64_json", extra_body=FAST, **size
    )


@pytest.mark.parametrize("size", [{}, {"size": "auto"}])
def test_an_edit_without_a_size_keeps_the_images_shape(client: openai.OpenAI, size: dict) -> None:
    # OpenAI's edits default to "auto", which follows the image; a landscape image was squashed to
    # the model's square default
    edit = _edit(client, "sd1", (97, 64), **size)
    # the model's own area (64 x 64) in the image's aspect, floored to its multiple of 8
    assert _size(edit) == (72, 48) and edit.size == "72x48"
    assert _size(_edit(client, "sd1", (400, 200), **size)) == (88, 40)  # a big image comes down
    assert _size(_edit(client, "sd1", (20, 40), **size)) == (40, 88)  # a small one goes up
    assert _size(_edit(client, "sd1", (97, 64), size="48x48")) == (48, 48)  # an asked size wins


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the client deprecates variations
def test_a_variation_without_a_size_keeps_the_images_shape(client: openai.OpenAI) -> None:
    r = client.images.create_variation(
        model="sd1", image=_png((64, 97)), response_format="b64_json", extra_body=FAST
    )
    assert _size(r) == (48, 72)


def test_a_fixed_size_model_edits_at_its_own_size(client: openai.OpenAI) -> None:
    assert _size(_edit(client, "digits", (97, 64))) == (16, 16)


def test_partial_images_of_a_latent_model_are_full_size_decodes(client: openai.OpenAI) -> None:
    # the latent prediction at step 2 of 4 decoded by the VAE at the asked size (not a thumbnail)
    events = list(
        client.images.generate(
            model="sd1",
            prompt="a red 3",
            size="48x64",
            stream=True,
            partial_images=1,
            output_format="webp",
            extra_body={"steps": 4, "seed": 3},
        )
    )
    assert [e.type for e in events] == ["image_generation.partial_image", "image_generation.completed"]
    partial, final = (Image.open(io.BytesIO(base64.b64decode(e.b64_json))) for e in events)
    assert partial.format == final.format == "WEBP" and partial.size == final.size == (48, 64)
    diff = np.abs(np.asarray(partial, dtype=int) - np.asarray(final, dtype=int)).mean()
    assert 0 < diff < 128  # an earlier prediction of the same image


def test_a_phone_photo_is_edited_upright(client: openai.OpenAI) -> None:
    # a camera JPEG stored 97x64 with EXIF orientation 6 (shown rotated: 64x97, portrait); edited as
    # stored, the result came back landscape
    buf, exif = io.BytesIO(), Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (97, 64), (120, 60, 200)).save(buf, format="JPEG", exif=exif)
    edit = client.images.edit(
        model="sd1", image=("p.jpg", buf.getvalue(), "image/jpeg"), prompt="a red 3", extra_body=FAST
    )
    assert _size(edit) == (48, 72) and edit.size == "48x72"

"""Weighted prompt encoding and clip_skip on the tiny SD text encoder, and through the API."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")

from fastapi.testclient import TestClient  # noqa: E402

from service.models.sd_text import apply_weights  # noqa: E402
from service.models.stable_diffusion import StableDiffusion  # noqa: E402
from service.models.store import ModelStore  # noqa: E402
from tests.support.compat import pixels  # noqa: E402
from tests.support.sd_tiny import tiny_sd_store  # noqa: E402


@pytest.fixture(scope="module")
def sd1() -> StableDiffusion:
    sd = ModelStore(tiny_sd_store()).load("sd1").text_model  # type: ignore[attr-defined]
    assert sd is not None
    return sd  # type: ignore[no-any-return]


def _ids(sd: StableDiffusion, pieces: list[str]) -> tuple[list[int], list[int]]:
    """Token ids of each piece tokenized on its own, and which piece each token came from."""
    tok = sd.text.tokenizers[0]
    ids, owner = [], []
    for i, piece in enumerate(pieces):
        got = tok(piece, add_special_tokens=False)["input_ids"]
        ids += got
        owner += [i] * len(got)
    return ids, owner


def _reference(
    sd: StableDiffusion, pieces: list[str], weights: list[float], clip_skip: int = 1
) -> torch.Tensor:
    """The chunk A1111 builds (fragments tokenized one by one), encoded, then weighted."""
    tok = sd.text.tokenizers[0]
    ids, owner = _ids(sd, pieces)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    chunk = [tok.bos_token_id, *ids, tok.eos_token_id] + [pad] * (75 - len(ids))
    w = torch.tensor([1.0, *[weights[o] for o in owner], 1.0] + [1.0] * (75 - len(ids)))
    enc = sd.components.text_encoders[0]
    with torch.inference_mode():
        out = enc(torch.tensor([chunk]), output_hidden_states=True)
        z = (
            out.last_hidden_state
            if clip_skip == 1
            else getattr(enc, "text_model", enc).final_layer_norm(out.hidden_states[-clip_skip])
        )
    return apply_weights(z, w.tolist())


def test_apply_weights_scales_tokens_and_restores_each_chunks_mean() -> None:
    torch.manual_seed(0)
    z = torch.randn(1, 154, 8) + 0.5
    w = [1.0] * 154
    w[3], w[80] = 2.0, 0.5
    out = apply_weights(z, w)
    for part_in, part_out in zip(z.split(77, dim=1), out.split(77, dim=1), strict=True):
        torch.testing.assert_close(part_out.mean(), part_in.mean())
    ratio = out / z
    torch.testing.assert_close(ratio[0, 3], 2 * ratio[0, 4])  # token 3 weighs twice its neighbour
    torch.testing.assert_close(ratio[0, 80], 0.5 * ratio[0, 81])
    torch.testing.assert_close(apply_weights(z, [1.0] * 154), z)


def test_weights_apply_per_token_with_the_mean_restored(sd1: StableDiffusion) -> None:
    got = sd1.text.encode("a (red:1.5) [cat]").context
    want = _reference(sd1, ["a ", "red", " ", "cat"], [1.0, 1.5, 1.0, 1 / 1.1])
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, sd1.text.encode("a red cat").context)


def test_unit_weights_and_escapes_encode_as_plain_text(sd1: StableDiffusion) -> None:
    torch.testing.assert_close(sd1.text.encode("(a red cat:1)").context, sd1.text.encode("a red cat").context)
    literal = sd1.text.encode("\\(cat\\)").context
    torch.testing.assert_close(literal, _reference(sd1, ["(cat)"], [1.0]))


def test_break_starts_a_new_chunk(sd1: StableDiffusion) -> None:
    enc = sd1.text.encode("a red BREAK cat")
    assert enc.chunks == 2
    torch.testing.assert_close(enc.context[:, :77], sd1.text.encode("a red").context)
    torch.testing.assert_close(enc.context[:, 77:], sd1.text.encode("cat").context)


def test_clip_skip_per_call(sd1: StableDiffusion) -> None:
    skip2 = sd1.text.encode("a red cat", clip_skip=2).context
    torch.testing.assert_close(skip2, _reference(sd1, ["a red cat"], [1.0], clip_skip=2))
    assert not torch.allclose(skip2, sd1.text.encode("a red cat").context)
    torch.testing.assert_close(
        sd1.text.encode("a (red:1.2) cat", clip_skip=2).context,
        _reference(sd1, ["a ", "red", " cat"], [1.0, 1.2, 1.0], clip_skip=2),
    )


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    from service.api.app import create_app
    from service.api.settings import Settings

    settings = Settings(model_store=tiny_sd_store(), models=["sd1"], torch_threads=1, batch_wait_ms=0)
    with TestClient(create_app(settings)) as c:
        yield c


def test_clip_skip_and_weights_through_the_apis(client: TestClient) -> None:
    body = {"prompt": "a (red:1.4) cat", "steps": 2, "seed": 1, "sampler": "euler", "width": 64, "height": 64}
    one = client.post("/sample", json=body)
    assert one.status_code == 200, one.text
    two = client.post("/sample", json={**body, "clip_skip": 2}).json()
    assert two["parameters"]["clip_skip"] == 2 and one.json()["images"] != two["images"]
    r = client.post(
        "/sdapi/v1/txt2img",
        json={**body, "sampler_name": "Euler", "override_settings": {"CLIP_stop_at_last_layers": 2}},
    )
    assert r.status_code == 200, r.text
    assert "Clip skip: 2" in r.json()["info"] and "a (red:1.4) cat\\nSteps: 2" in r.json()["info"]
    assert (pixels(r.json()["images"][0]) == pixels(two["images"][0])).all()

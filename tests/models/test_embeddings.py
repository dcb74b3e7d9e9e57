"""Textual-inversion embeddings: the files as A1111, kohya and diffusers write them, hostile files
skipped with their reason, and A1111's name matching (the token-sequence rule of
``EmbeddingDatabase.find_embedding_at_position`` and ``sd_hijack_clip.tokenize_line``'s chunking) on
the tiny SD1 model's CLIP tokenizer; ComfyUI's ``embedding:name`` spelling; requests with and without
embeddings share model calls."""

from __future__ import annotations

import base64
import io
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")

from service.api.app import create_app  # noqa: E402
from service.api.settings import Settings  # noqa: E402
from service.models.embeddings import RESCAN_S, EmbeddingIndex, attach_embeddings  # noqa: E402
from service.models.sd_text import PLACEHOLDER  # noqa: E402
from service.models.store import ModelStore  # noqa: E402
from service.sampling.errors import InputError  # noqa: E402
from tests.support.embedding_files import (  # noqa: E402
    a1111_pt,
    a1111_pt_torch111,
    concept_bin,
    emb_params,
    pickled_code,
    sdxl_pair,
    vectors,
)
from tests.support.sd_tiny import tiny_sd_store  # noqa: E402

WIDTH = 32  # the tiny SD1 text encoder's


@pytest.fixture(scope="module")
def sd1() -> Any:
    return ModelStore(tiny_sd_store()).load("sd1")


def _attach(model: Any, root: Path) -> Any:
    attach_embeddings(model, EmbeddingIndex(root, max_age_s=0))  # every prompt rescans
    return model.text_model.text


def _fixes(text: Any, prompt: str) -> list[tuple[int, int]]:
    """(position in its 77-token chunk, vectors) of every embedding in ``prompt``'s first chunk."""
    chunks = text.token_chunks([(prompt, 1.0)], 0, text.embedding_set())
    return [(pos, int(vec.shape[0])) for pos, vec in chunks.fixes[0]]


def test_every_layout_loads_and_hostile_files_are_skipped_with_the_reason(sd1: Any, tmp_path: Path) -> None:
    folder = tmp_path / "embeddings"
    a1111_pt(folder / "a1111.pt", vectors(3, WIDTH, 1), step=1500)
    a1111_pt_torch111(folder / "old.pt", vectors(2, WIDTH, 8))
    emb_params(folder / "sub" / "kohya.safetensors", vectors(2, WIDTH, 2))
    concept_bin(folder / "concept.bin", "<concept>", vectors(1, WIDTH, 3)[0])
    sdxl_pair(folder / "xl.safetensors", vectors(2, WIDTH, 4), vectors(2, 48, 5))
    emb_params(folder / "wide.safetensors", vectors(1, 768, 6))
    marker = tmp_path / "code-ran"
    pickled_code(folder / "evil.pt", marker, vectors(1, WIDTH, 7))
    (folder / "corrupt.pt").write_bytes(b"PK\x03\x04 not really a zip" * 10)
    (folder / "truncated.safetensors").write_bytes((1000).to_bytes(8, "little") + b'{"emb_params"')
    (folder / "notes.txt").write_text("ignored: not an embedding extension")
    torch.save({"a": torch.zeros(1, WIDTH), "b": torch.zeros(1, WIDTH)}, folder / "twokeys.pt")
    text = _attach(sd1, tmp_path)

    listing = text.embeddings.catalog().listing()
    assert set(listing["loaded"]) == {"a1111", "kohya", "concept", "old"}
    assert listing["loaded"]["a1111"] == {"step": 1500, "sd_checkpoint": "a9263745",
                                          "sd_checkpoint_name": "v1-5-pruned-emaonly", "shape": WIDTH,
                                          "vectors": 3}  # fmt: skip
    assert listing["loaded"]["kohya"]["vectors"] == 2 and listing["loaded"]["concept"]["vectors"] == 1
    assert torch.equal(text.embeddings.catalog().loaded["old"].parts[""], vectors(2, WIDTH, 8))  # torch 1.11
    skipped = {name: entry["reason"] for name, entry in listing["skipped"].items()}
    assert set(skipped) == {"xl", "wide", "evil", "corrupt", "truncated", "twokeys"}
    assert "does not fit" in skipped["xl"] and "does not fit" in skipped["wide"]
    assert listing["skipped"]["xl"]["shape"] == WIDTH + 48 and listing["skipped"]["wide"]["shape"] == 768
    assert "needs Python code" in skipped["evil"] and not marker.exists()  # refused, never run
    assert "posix.system" in skipped["evil"]  # what it wanted to call
    assert skipped["corrupt"].startswith("unreadable") and skipped["truncated"].startswith("unreadable")
    assert "not an embedding" in skipped["twokeys"]
    assert EmbeddingIndex(tmp_path).comfy_names() == sorted(
        ["a1111", "old", "sub/kohya", "concept", "xl", "wide", "evil", "corrupt", "truncated", "twokeys"]
    )
    assert "sub/kohya.safetensors" in EmbeddingIndex(tmp_path).comfy_files()
    # the prompt still encodes (the bad files are simply not there)
    assert text.encode("a red a1111 cat").context.shape == (1, 77, WIDTH)


def test_model_folder_names_win_and_changed_files_are_read_again(sd1: Any, tmp_path: Path) -> None:
    shared = a1111_pt(tmp_path / "embeddings" / "style.pt", vectors(1, WIDTH, 1))
    (tmp_path / "sd1").mkdir()
    (tmp_path / "sd1" / "manifest.json").write_text("{}")
    a1111_pt(tmp_path / "sd1" / "embeddings" / "style.pt", vectors(2, WIDTH, 2))
    a1111_pt(tmp_path / "other" / "embeddings" / "elsewhere.pt", vectors(1, WIDTH, 3))
    (tmp_path / "other" / "manifest.json").write_text("{}")
    text = _attach(sd1, tmp_path)
    catalog = text.embeddings.catalog()
    assert catalog.loaded["style"].vectors == 2 and "elsewhere" not in catalog.loaded  # another model's
    assert "already used" in catalog.skipped["style"][1]
    before = text.encode("a style cat").context
    a1111_pt(tmp_path / "sd1" / "embeddings" / "style.pt", vectors(2, WIDTH, 9))  # replaced in place
    os.utime(tmp_path / "sd1" / "embeddings" / "style.pt", ns=(1, 10**18))  # even within one mtime tick
    after = text.encode("a style cat").context  # the cache key changed with the file
    assert not torch.equal(before, after)
    shared.unlink()
    (tmp_path / "sd1" / "embeddings" / "style.pt").unlink()
    torch.testing.assert_close(text.encode("a style cat").context, text.encode("a  style cat").context)
    assert text.embeddings.catalog().loaded == {}


def test_names_are_matched_by_their_token_sequence_as_a1111_does(sd1: Any, tmp_path: Path) -> None:
    folder = tmp_path / "embeddings"
    for name, n in (("cat", 2), ("red cat", 3), ("EasyNegative", 1), ("bad-hands-5", 2), ("red", 1)):
        a1111_pt(folder / f"{name}.pt", vectors(n, WIDTH, len(name)))
    text = _attach(sd1, tmp_path)
    # A name that is an ordinary word replaces that word, in any case, next to punctuation
    assert _fixes(text, "a cat") == [(2, 2)]
    assert _fixes(text, "A CAT, sitting") == [(2, 2)]
    # ... but not inside another word: CLIP marks a word's last token ("cat</w>" != "cat" of "cats")
    assert _fixes(text, "cats") == [] and _fixes(text, "catdog") == []
    # the longest name starting with the same token wins ("red cat" over "red"), then "red" alone
    assert _fixes(text, "a red cat") == [(2, 3)]
    assert _fixes(text, "a red dog") == [(2, 1)]
    # one word in the name: "easy negative" is two words, so it does not match
    assert _fixes(text, "EasyNegative") == [(1, 1)] and _fixes(text, "easynegative,") == [(1, 1)]
    assert _fixes(text, "easy negative") == []
    # CLIP splits punctuation into words of their own: "bad - hands - 5" has the name's tokens,
    # "bad hands 5" lacks the two "-"
    assert _fixes(text, "bad-hands-5") == [(1, 2)] and _fixes(text, "bad - hands - 5") == [(1, 2)]
    assert _fixes(text, "bad hands 5") == []
    # placeholders take the vectors' places; the tokens after them move on
    chunks = text.token_chunks([("a cat dog", 1.0)], 0, text.embedding_set())
    tok = text.tokenizers[0]
    dog = tok("dog", add_special_tokens=False)["input_ids"]
    assert chunks.ids[0][2:4] == [PLACEHOLDER] * 2 and chunks.ids[0][4 : 4 + len(dog)] == dog


def test_an_embedding_is_never_split_over_two_chunks_and_takes_its_fragment_weight(
    sd1: Any, tmp_path: Path
) -> None:
    a1111_pt(tmp_path / "embeddings" / "emb.pt", vectors(3, WIDTH, 1))
    text = _attach(sd1, tmp_path)
    tok = text.tokenizers[0]
    filler = "dog " * 73  # 73 tokens: a 3-vector embedding no longer fits in the first chunk
    assert len(tok(filler, add_special_tokens=False)["input_ids"]) == 73
    chunks = text.token_chunks([(filler + "emb", 1.0)], 0, text.embedding_set())
    assert len(chunks.ids) == 2 and chunks.fixes[0] == [] and [p for p, _ in chunks.fixes[1]] == [1]
    assert chunks.ids[0][74:] == [tok.eos_token_id] + [tok.pad_token_id] * 2  # 73 tokens, EOS, padding
    weighted = text.token_chunks([("a ", 1.0), ("emb", 1.3)], 0, text.embedding_set())
    assert weighted.weights[0][1:6] == [1.0, 1.3, 1.3, 1.3, 1.0]
    assert text.encode("a (emb:1.3)").context.shape == (1, 77, WIDTH)


def test_comfyui_embedding_spelling(sd1: Any, tmp_path: Path) -> None:
    a1111_pt(tmp_path / "embeddings" / "emb.pt", vectors(3, WIDTH, 1))
    emb_params(tmp_path / "embeddings" / "sub" / "neg.safetensors", vectors(2, WIDTH, 2))
    emb_params(tmp_path / "embeddings" / "wide.safetensors", vectors(2, 768, 3))
    text = _attach(sd1, tmp_path)
    want = text.encode("a red emb cat").context
    for spelling in ("embedding:emb", "embedding:emb.pt", "embedding:emb.PT"):
        torch.testing.assert_close(text.encode(f"a red {spelling} cat").context, want)
    assert _fixes(text, "embedding:emb, cat") == [(1, 3)]  # the comma stays text (ComfyUI)
    assert _fixes(text, "embedding:sub/neg") == [(1, 2)] and _fixes(text, "embedding:neg.safetensors") == [
        (1, 2)
    ]
    assert _fixes(text, "xembedding:missing") == []  # only a whole word is a reference (no error)
    assert _fixes(text, "xembedding:emb") == [(12, 3)]  # ... though "emb" after ":" is still the name
    cond = sd1.text_model.text_conditioning
    with pytest.raises(InputError) as err:
        cond("a cat", "embedding:missing", 1, 64, 64, guided=True)
    assert err.value.field == "negative_prompt" and err.value.allowed == ["emb", "neg"]
    with pytest.raises(InputError) as err:
        cond("embedding:wide", None, 1, 64, 64, guided=True)
    assert err.value.field == "prompt" and "does not fit" in str(err.value)


def test_requests_with_and_without_embeddings_share_model_calls(tmp_path: Path) -> None:
    (tmp_path / "sd1").symlink_to(tiny_sd_store() / "sd1", target_is_directory=True)
    a1111_pt(tmp_path / "embeddings" / "emb.pt", vectors(6, WIDTH, 1, std=2.0))
    settings = Settings(model_store=tmp_path, models=["sd1"], torch_threads=1, batch_wait_ms=300)
    prompts = ["a red emb cat", "a red cat", "emb", "the dog"]
    common = {"model": "sd1", "negative_prompt": "dog", "steps": 3, "seed": 5, "sampler": "euler"}
    bodies = [{**common, "prompt": p, "cfg_scale": 20.0, "width": 64, "height": 64} for p in prompts]

    def rows_and_calls(metrics: str) -> tuple[float, float]:
        found = dict(re.findall(r'kdiff_batch_rows_(sum|count)\{model="sd1"\} (\S+)', metrics))
        return float(found["sum"]), float(found["count"])

    def pixels(r: Any) -> Any:
        assert r.status_code == 200, r.text
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))), dtype=np.int16)

    with TestClient(create_app(settings)) as c:
        solo = [pixels(c.post("/sample", json=b)) for b in bodies]
        before = rows_and_calls(c.get("/metrics").text)
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda b: pixels(c.post("/sample", json=b)), bodies))
        after = rows_and_calls(c.get("/metrics").text)
    rows, calls = after[0] - before[0], after[1] - before[1]
    assert rows == 4 * 3 * 2 and calls < 12, f"{rows} rows in {calls} calls: the requests did not share calls"
    for s, t in zip(solo, together, strict=True):
        assert np.abs(s - t).max() <= 1  # each image as its request run alone
    assert np.abs(solo[0] - solo[1]).max() > 10  # the embedding acts


def test_prompts_see_a_new_file_within_the_rescan_interval(sd1: Any, tmp_path: Path) -> None:
    index = EmbeddingIndex(tmp_path)  # the served default: folders walked at most once per RESCAN_S
    attach_embeddings(sd1, index)
    before = sd1.text_model.text.encode("a late cat").context
    a1111_pt(tmp_path / "embeddings" / "late.pt", vectors(2, WIDTH, 1))
    time.sleep(RESCAN_S + 0.05)
    assert not torch.equal(sd1.text_model.text.encode("a late cat").context, before)
    assert "late" in index.catalog("sd1", [WIDTH]).loaded

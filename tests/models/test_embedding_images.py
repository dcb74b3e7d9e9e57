"""A1111's embedding images (an embedding inside a PNG, as A1111's training tab saves it): the data in
an ``sd-ti-embedding`` text chunk or hidden in the pixels (tests/support/embedding_files.py writes both
as modules/textual_inversion/image_embedding.py lays them out), read to the same vectors as the .pt
A1111 saves beside them, named by the name the data holds; previews, plain pictures, damaged data and
bombs are skipped with the reason (through the image gate), nothing else breaks."""

from __future__ import annotations

import base64
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from service.models.embeddings import EmbeddingIndex
from tests.support.embedding_files import a1111_image_chunk, a1111_image_pixels, a1111_pt, vectors
from tests.support.hostile_images import bomb_png

WIDTH = 32


def _png_with_text(path: Path, text: str) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", text)
    Image.new("RGB", (16, 16), (120, 130, 140)).save(path, pnginfo=info)


def test_embedding_images_load_as_a1111_reads_them(tmp_path: Path) -> None:
    folder = tmp_path / "embeddings"
    chunk_vec, pixel_vec = vectors(3, WIDTH, 1), vectors(5, WIDTH, 2)
    a1111_image_chunk(folder / "chunked-1500.png", chunk_vec, "chunked")
    a1111_image_pixels(folder / "hidden-500.png", pixel_vec, "hidden")
    a1111_pt(folder / "hidden-pt.pt", pixel_vec)  # what A1111 saves beside the image
    Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / "hidden-pt.preview.png")  # a UI preview: not read
    Image.new("RGB", (32, 32), (200, 100, 50)).save(folder / "just-a-picture.png")
    cut = folder / "cut.png"
    a1111_image_pixels(cut, pixel_vec, "cut")
    img = Image.open(cut).convert("RGB")
    for x in range(4):  # the zlib header's low nibbles flipped: the stream is damaged
        r, g, b = img.getpixel((x, 0))  # type: ignore[misc]
        img.putpixel((x, 0), (r ^ 0x05, g ^ 0x03, b ^ 0x06))
    img.save(cut)
    _png_with_text(folder / "badchunk.png", "not base64 json ###")
    _png_with_text(folder / "notjson.png", base64.b64encode(b"[1, 2").decode())
    (folder / "bomb.png").write_bytes(bomb_png(5000, 5000))

    index = EmbeddingIndex(tmp_path)
    catalog = index.catalog("m", [WIDTH], fresh=True)
    assert torch.equal(catalog.loaded["chunked"].parts[""], chunk_vec)  # float32 survives the JSON
    assert torch.equal(catalog.loaded["hidden"].parts[""], pixel_vec)
    assert torch.equal(catalog.loaded["hidden"].parts[""], catalog.loaded["hidden-pt"].parts[""])
    listing = catalog.listing()
    assert listing["loaded"]["hidden"] == {"step": 1500, "sd_checkpoint": "a9263745",
                                           "sd_checkpoint_name": "v1-5-pruned-emaonly", "shape": WIDTH,
                                           "vectors": 5}  # fmt: skip
    skipped = {name: entry["reason"] for name, entry in listing["skipped"].items()}
    assert set(skipped) == {"just-a-picture", "cut", "badchunk", "notjson", "bomb"}, skipped
    assert "no embedding data" in skipped["just-a-picture"]
    assert "not zlib data" in skipped["cut"]
    assert "not base64" in skipped["badchunk"]
    assert "JSON" in skipped["notjson"]
    assert "image gate" in skipped["bomb"] and "pixels" in skipped["bomb"]
    assert not any("preview" in info.ref for info in index.scan())
    # ComfyUI reads no embedding images: its lists stay its own kinds
    assert index.comfy_names() == ["hidden-pt"]


def test_a_prompt_uses_an_embedding_image_by_the_name_its_data_holds(tmp_path: Path) -> None:
    """On the tiny SD 1.x model: ``hidden`` (the data's name; the file is saved-image.png) in a prompt
    is replaced by the image's 5 vectors, as A1111 names it; the file's stem names nothing."""
    from service.models.embeddings import attach_embeddings
    from service.models.store import ModelStore
    from tests.support.sd_tiny import tiny_sd_store

    a1111_image_pixels(tmp_path / "embeddings" / "saved-image.png", vectors(5, WIDTH, 2), "hidden")
    model = ModelStore(tiny_sd_store()).load("sd1")
    attach_embeddings(model, EmbeddingIndex(tmp_path, max_age_s=0))
    text = model.text_model.text
    for prompt, want in [("a hidden cat", [5]), ("a saved-image cat", [])]:
        chunks = text.token_chunks([(prompt, 1.0)], 0, text.embedding_set())
        assert [int(vec.shape[0]) for _, vec in chunks.fixes[0]] == want, prompt

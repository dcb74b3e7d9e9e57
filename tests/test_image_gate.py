"""The image gate (service/image_gate.py) on real encoders' files, hostile ones included: what passes,
what is refused (always an ImageInputError naming the field, never another exception), and that a
bomb is refused from its header, before its pixels are decoded."""

from __future__ import annotations

import base64
import time
import tracemalloc

import pytest
import torch
from PIL import Image

from service import image_gate
from service.image_gate import GatedImage, ImageInputError
from tests.support.hostile_images import (
    a1111_jpeg,
    animated_png,
    animated_webp,
    b64,
    bomb_png,
    encoded,
    jpeg_claiming,
    jpeg_segments,
    many_scan_jpeg,
    noisy,
    raw_ztxt_png,
    small_png,
    truncated,
    webp_claiming,
    ztxt_png,
)


def _refused(data: str | bytes, field: str = "init_image") -> str:
    with pytest.raises(ImageInputError) as info:
        image_gate.load(data, field)
    assert info.value.field == field and info.value.message.startswith(f"{field}: ")
    return info.value.message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_png_jpeg_and_webp_pass_as_base64_data_urls_and_bytes(fmt: str) -> None:
    data = encoded(noisy((40, 24)), fmt, **({"quality": 95} if fmt != "PNG" else {}))
    mime = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}[fmt]
    for form in (data, b64(data), f"data:image/{mime};base64,{b64(data)}"):
        t = image_gate.to_tensor(form, "init_image", None, 3)
        assert t.shape == (1, 3, 24, 40) and -1 <= t.min() and t.max() <= 1
    # Wrapped base64 (the `base64` CLI's 76-column lines) is taken too.
    wrapped = "\n".join(b64(data)[i : i + 76] for i in range(0, len(b64(data)), 76))
    assert image_gate.load(wrapped, "init_image").image.size == (40, 24)


def test_pixels_match_pil_and_resizing() -> None:
    img = noisy((20, 10))
    t = image_gate.to_tensor(encoded(img, "PNG"), "init_image", None, 3)
    expected = torch.tensor(list(img.tobytes()), dtype=torch.float32).view(10, 20, 3).permute(2, 0, 1)
    assert torch.equal(((t[0] + 1) * 127.5).round(), expected)
    small = image_gate.to_tensor(encoded(img, "PNG"), "mask", (5, 8), 1)
    assert small.shape == (1, 1, 5, 8)


@pytest.mark.parametrize(
    ("name", "image", "mode"),
    [
        ("16-bit greyscale PNG", Image.new("I;16", (8, 8), 40000), "L"),
        ("CMYK JPEG", Image.new("CMYK", (8, 8), (10, 20, 30, 40)), "CMYK"),
        ("palette PNG with transparency", Image.new("P", (8, 8), 3), "P"),
        ("RGBA PNG", Image.new("RGBA", (8, 8), (1, 2, 3, 0)), "RGBA"),
        ("1-bit PNG", Image.new("1", (8, 8), 1), "1"),
    ],
)
def test_unusual_modes_decode(name: str, image: Image.Image, mode: str) -> None:
    fmt = "JPEG" if image.mode == "CMYK" else "PNG"
    data = encoded(image, fmt, **({"transparency": 3} if image.mode == "P" else {}))
    gated = image_gate.load(data, "init_image")
    assert gated.image.mode == mode, name
    for channels in (1, 3):
        t = image_gate.to_tensor(gated, "init_image", None, channels)
        assert t.shape == (1, channels, 8, 8) and torch.isfinite(t).all()
    if image.mode == "I;16":  # 40000 / 256 = 156: scaled to 8 bits, not clipped to 255
        assert int(gated.image.getpixel((0, 0))) == 156  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "make", "says"),
    [
        ("12000x12000 PNG bomb", lambda: bomb_png(12000, 12000), "12000x12000 is 144000000 pixels"),
        ("20000x20000 PNG (past PIL's own bomb check)", lambda: bomb_png(20000, 20000, 0), "larger than"),
        ("JPEG claiming 12000x12000", lambda: jpeg_claiming(12000, 12000), "12000x12000"),
        ("WebP claiming 16000x16000", lambda: webp_claiming(16000, 16000), "larger than"),
        ("5000x4000 PNG (20 MP, one past the default)", lambda: bomb_png(5000, 4000), "5000x4000"),
    ],
)
def test_oversized_images_are_refused_from_the_header(name: str, make: object, says: str) -> None:
    data = make()  # type: ignore[operator]
    tracemalloc.start()
    try:
        t0 = time.thread_time()
        message = _refused(b64(data))
        seconds = time.thread_time() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert says in message and "pixels" in message, message
    # The base64 text and its bytes, not the 100s of MB of pixels; and no decoding time.
    assert peak < 4 * len(data) + 2**20, (name, peak)
    assert seconds < 0.5, (name, seconds)


def test_the_pixel_limit_is_the_setting() -> None:
    data = small_png((100, 100))
    try:
        image_gate.set_max_pixels(99 * 100)
        assert "100x100 is 10000 pixels; at most 9900" in _refused(data, "mask")
        image_gate.set_max_pixels(100 * 100)
        assert image_gate.load(data, "mask").image.size == (100, 100)
    finally:
        image_gate.set_max_pixels(image_gate.DEFAULT_MAX_PIXELS)


@pytest.mark.parametrize(
    ("name", "data", "says"),
    [
        ("truncated PNG", truncated(encoded(noisy((64, 64)), "PNG")), "truncated"),
        ("truncated JPEG", truncated(encoded(noisy((64, 64)), "JPEG")), "truncated"),
        ("truncated WebP", truncated(encoded(noisy((64, 64)), "WEBP")), "not a readable"),
        ("PNG header only", small_png()[:40], "not a readable PNG"),
        ("animated PNG", animated_png(), "animated image (3 frames)"),
        ("animated WebP", animated_webp(), "animated image (3 frames)"),
        ("GIF", encoded(Image.new("RGB", (8, 8)), "GIF"), "not a PNG, JPEG or WebP"),
        ("BMP", encoded(Image.new("RGB", (8, 8)), "BMP"), "not a PNG, JPEG or WebP"),
        ("TIFF", encoded(Image.new("RGB", (8, 8)), "TIFF"), "not a PNG, JPEG or WebP"),
        ("SVG text", b"<svg xmlns='http://www.w3.org/2000/svg'/>", "not a PNG, JPEG or WebP"),
        ("empty", b"", "not a PNG, JPEG or WebP image (0 bytes)"),
        ("2 MB zTXt chunk (2 KB compressed)", raw_ztxt_png([("x", b"a" * 2_000_000)]), "text chunks"),
        ("six 900 KB zTXt chunks", raw_ztxt_png([(f"k{i}", b"a" * 900_000) for i in range(6)]), "text"),
    ],
)
def test_broken_and_hostile_files_are_refused(name: str, data: bytes, says: str) -> None:
    assert says in _refused(b64(data)), name


def test_a_jpeg_of_many_scans_is_refused_before_decoding() -> None:
    """Each scan of a progressive JPEG decodes the whole image again: 5,000 scans of a 4096 x 4096
    image held a core for 30 s. Counted from the markers, refused without decoding."""
    bomb = many_scan_jpeg(5_000)
    t0 = time.thread_time()
    message = _refused(bomb)
    assert "5000 scans; at most 100" in message and time.thread_time() - t0 < 0.05, message
    assert image_gate.load(many_scan_jpeg(image_gate.MAX_JPEG_SCANS), "image").image.size == (64, 64)


def test_jpeg_scans_are_counted_from_the_markers_not_from_stray_bytes() -> None:
    """Progressive files as encoders write them pass; FF DA bytes inside an EXIF block or a comment
    before the first scan are skipped by the segments' lengths, not counted as scans."""
    progressive = encoded(noisy((64, 64)), "JPEG", progressive=True)
    scans = sum(m == 0xDA for m, _ in jpeg_segments(progressive))
    assert image_gate.jpeg_scans(progressive) == scans > 1
    stray = b"\xff\xda" * 5_000
    comment = b"\xff\xfe" + (len(stray) + 2).to_bytes(2, "big") + stray
    exif = Image.Exif()
    exif[0x010E] = stray.decode("latin-1")  # ImageDescription
    for data in (
        progressive[:2] + comment + progressive[2:],
        encoded(noisy((64, 64)), "JPEG", progressive=True, exif=exif.tobytes()),
    ):
        assert image_gate.jpeg_scans(data) == scans
        assert image_gate.load(data, "image").image.size == (64, 64)
    segments = b"\xff\xfe\x00\x04xx" * (image_gate.MAX_JPEG_SEGMENTS + 1)  # empty comments
    assert "over 4096 segments" in _refused(progressive[:2] + segments + progressive[2:])


def test_whitespace_in_base64_is_dropped_as_bytes() -> None:
    """Wrapped base64 decodes; 16 MB of "A " is refused without a long GIL hold (a regex took
    0.5 s of one thread); non-ASCII text is a refusal, not an encoding error."""
    data = small_png()
    text = b64(data)
    wrapped = " \t".join(text[i : i + 7] for i in range(0, len(text), 7)) + "\r\n"
    assert image_gate.b64_bytes(wrapped, "image") == data
    t0 = time.thread_time()
    assert "not a PNG" in _refused("A " * 7_900_000) and time.thread_time() - t0 < 0.2
    assert "non-ASCII" in _refused(text[:20] + " \u00e9" + text[20:])


def test_a_flipped_byte_in_the_pixels_is_refused() -> None:
    data = bytearray(encoded(noisy((64, 64)), "PNG"))
    data[len(data) // 2] ^= 0xFF  # inside IDAT: a CRC or zlib error
    assert "not a readable PNG" in _refused(bytes(data))


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("not base64!!", "not valid base64"),
        ("data:image/png," + "iVBORw0KGgo=", "data URL must be"),
        ("data:text/plain;base64,aGVsbG8=", "not an image"),
        ("data:;base64," + b64(b"hello"), "not a PNG, JPEG or WebP"),
    ],
)
def test_bad_text_and_data_urls(text: str, says: str) -> None:
    assert says in _refused(text)


def test_overlong_base64_is_refused_before_decoding() -> None:
    text = "A" * (image_gate.MAX_B64_CHARS + 4)
    t0 = time.thread_time()
    message = _refused(text)
    assert f"at most {image_gate.MAX_B64_CHARS}" in message and time.thread_time() - t0 < 0.05
    assert "at most" in _refused(b"\x89PNG" + bytes(image_gate.MAX_FILE_BYTES), "image")


def test_a_gated_image_passes_as_it_is() -> None:
    gated = image_gate.load(small_png(), "image")
    assert image_gate.load(gated, "init_image") is gated
    assert isinstance(gated, GatedImage) and gated.field == "image"


def test_text_chunks_read_without_decoding_pixels() -> None:
    png = ztxt_png({"parameters": "a cat\nSteps: 20, Sampler: Euler, Seed: 1", "kdiff": "{}"}, itxt=True)
    assert image_gate.text_chunks(base64.b64encode(png).decode(), "image")["kdiff"] == "{}"
    # A1111's JPEGs: the infotext in EXIF UserComment (UTF-16 big-endian after b"UNICODE\0").
    text = "a café, 猫\nSteps: 20, Sampler: DPM++ 2M, Seed: 5"
    assert image_gate.text_chunks(a1111_jpeg(text), "image") == {"parameters": text}
    # 40,000 characters behind a 153-byte PNG: read, it is the parser's job to be fast.
    chunks = image_gate.text_chunks(ztxt_png({"parameters": "a" * 40_000}), "image")
    assert len(chunks["parameters"]) == 40_000
    with pytest.raises(ImageInputError, match="pixels"):
        image_gate.text_chunks(bomb_png(20000, 20000, 0), "image")


def test_no_other_exception_leaves_the_gate_on_mangled_files() -> None:
    """Real files with bytes overwritten at many places: refused or read, never anything else."""
    sources = [encoded(noisy((32, 32)), f) for f in ("PNG", "JPEG", "WEBP")]
    for src in sources:
        for at in range(0, len(src), max(1, len(src) // 60)):
            for value in (0x00, 0xFF):
                data = bytearray(src)
                data[at] = value
                try:
                    image_gate.to_tensor(bytes(data), "image", None, 3)
                except ImageInputError:
                    pass


def test_long_base64_decodes_in_slices_exactly_as_whole() -> None:
    """Long base64 is decoded a slice at a time (so the GIL is released between slices); the result
    and what is refused are those of one strict decode."""
    rng = torch.Generator().manual_seed(0)
    for n in (0, 5, 3 * 2**16, 3 * 2**16 + 1, 1_000_003):
        raw = bytes(torch.randint(0, 256, (n,), generator=rng, dtype=torch.uint8).tolist())
        assert image_gate.b64_bytes(base64.b64encode(raw).decode(), "image") == raw
    text = base64.b64encode(bytes(3 * 2**16)).decode()
    for bad in (text[:-4] + "QQ==" + text, text + "!", text[:-1]):  # padding inside, junk, cut
        with pytest.raises(ImageInputError, match="not valid base64"):
            image_gate.b64_bytes(bad, "image")

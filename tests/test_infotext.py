"""A1111 infotext parsing (service/infotext.py): the same pairs as A1111's own pattern on every line
(the pattern is the oracle, on random and real lines), in time linear in the text's length, and
bounded (the pattern took 6.8 s on 40,000 letters)."""

from __future__ import annotations

import random
import re
import time

import pytest

from service import infotext

# A1111's pattern (modules/infotext_utils.py re_param, with the key characters this project accepts).
A1111_PAIR = re.compile(r'\s*([\w][\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')

REAL_LINES = [
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3847598, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1",
    'Steps: 30, Sampler: Euler a, CFG scale: 5, Seed: 1, Size: 1024x1024, Lora hashes: "add_detail: '
    '7c6bad76eb54, epiNoiseoffset_v2: d1131f7207d6", TI hashes: "easynegative: c74b4e810b03", '
    'ADetailer model: face_yolov8n.pt, ADetailer prompt: "a face, smiling", Version: v1.9.4',
    "Steps: 25, Sampler: DPM++ SDE, Hires upscale: 2, Hires upscaler: R-ESRGAN 4x+, Denoising "
    'strength: 0.4, ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1.0"',
    'Steps: 20, Template: "a \\"quoted\\" prompt, with commas", Emphasis: Original, Seed: 9',
]


def test_pairs_equal_a1111s_pattern_on_real_lines() -> None:
    for line in REAL_LINES:
        assert infotext.pairs_of(line) == A1111_PAIR.findall(line)


def test_pairs_equal_a1111s_pattern_on_random_lines() -> None:
    alphabet = ["a", "Z", " ", ":", ",", '"', "\\", "-", "/", "+", ".", "\t", "é", "_", "7", "\r", "\xa0"]
    rng = random.Random(23)
    for _ in range(30_000):
        line = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert infotext.pairs_of(line) == A1111_PAIR.findall(line), repr(line)


@pytest.mark.parametrize(
    "make",
    [
        lambda n: "a" * n,  # the issue's: one long key-like run without a colon
        lambda n: 'a:"' * (n // 3),  # unclosed quotes after every colon
        lambda n: 'k: "\\", ' * (n // 8) + '"x',  # escaped quotes: each scan would run to the end
        lambda n: ("a" * 100 + ".") * (n // 101),
        lambda n: ":" * n,
        lambda n: "Steps: 20, Sampler: Euler a, " * (n // 29),
    ],
)
def test_parsing_is_linear(make: object) -> None:
    def seconds(n: int) -> float:
        """CPU seconds of this thread (not wall time: the machine's other load does not count)."""
        text = make(n)  # type: ignore[operator]
        best = float("inf")
        for _ in range(3):
            t0 = time.thread_time()
            infotext.parse(text)
            best = min(best, time.thread_time() - t0)
        return best

    small, large = seconds(16_000), seconds(256_000)  # 16x the text
    assert large < 1.0, large
    assert large < 16 * 3 * small + 0.03, (small, large)  # linear with slack; quadratic would be 256x


def test_the_issue_body_parses_fast_and_the_input_is_bounded() -> None:
    t0 = time.thread_time()
    out = infotext.parse("a" * 40_000)
    assert out["Prompt"] == "a" * 40_000 and time.thread_time() - t0 < 0.05
    with pytest.raises(infotext.InfotextTooLong):
        infotext.parse("a" * (infotext.MAX_CHARS + 1))


def test_parse_reads_an_a1111_infotext() -> None:
    text = "a cat,\nsitting\nNegative prompt: dog, blurry\n" + REAL_LINES[1]
    out = infotext.parse(text)
    assert out["Prompt"] == "a cat,\nsitting" and out["Negative prompt"] == "dog, blurry"
    assert out["Lora hashes"] == "add_detail: 7c6bad76eb54, epiNoiseoffset_v2: d1131f7207d6"
    assert out["Size-1"] == "1024" and out["Size-2"] == "1024" and out["Sampler"] == "Euler a"


def test_hires_fields_as_a1111_writes_them() -> None:
    """Our recorded ``hires`` (serving/hires.py) -> A1111's Hires fields; the first pass's Size."""
    p = {"prompt": "a cat", "steps": 20, "sampler": "euler", "schedule": "karras", "cfg_scale": 7.0,
         "seed": 3, "width": 512, "height": 512, "model": "sd1",
         "hires": {"upscaler": "Latent (bicubic)", "steps": 10, "denoise": 0.55, "scale": 1.5,
                   "sampler": "dpmpp_2m", "schedule": "karras", "width": 768, "height": 768}}  # fmt: skip
    parsed = infotext.parse(infotext.from_parameters(p))
    assert parsed["Size"] == "512x512" and parsed["Denoising strength"] == "0.55"
    assert parsed["Hires upscale"] == "1.5" and parsed["Hires steps"] == "10"
    assert parsed["Hires upscaler"] == "Latent (bicubic)" and parsed["Hires sampler"] == "DPM++ 2M"
    resized = {**p, "hires": {**p["hires"], "resize_x": 800, "resize_y": 600}}
    del resized["hires"]["scale"]
    assert infotext.parse(infotext.from_parameters(resized))["Hires resize"] == "800x600"


def test_parse_fills_what_a1111s_parse_generation_parameters_fills() -> None:
    """infotext_utils.parse_generation_parameters: every "WxH" value split into -1 / -2 (re_imagesize),
    lines stripped, and its defaults for fields the text leaves out (a client pasting png-info's
    parameters back reads them: "Clip skip", "Hires resize-1", "RNG", ...)."""
    text = "  a cat  \nNegative prompt: dog \n" + REAL_LINES[0].replace(
        "Version", "Hires resize: 1024x1536, Version"
    )
    out = infotext.parse(text)
    assert out["Prompt"] == "a cat" and out["Negative prompt"] == "dog"
    assert (out["Hires resize-1"], out["Hires resize-2"]) == ("1024", "1536")
    assert (out["Size-1"], out["Size-2"]) == ("512", "768") and out["Schedule type"] == "Karras"
    assert out["Clip skip"] == "1" and out["RNG"] == "GPU" and out["Hires sampler"] == "Use same sampler"
    assert out["Hires checkpoint"] == "Use same checkpoint" and out["Masked area padding"] == 32
    given = infotext.parse("a\n" + REAL_LINES[0].replace("Version", "Clip skip: 2, RNG: CPU, Version"))
    assert given["Clip skip"] == "2" and given["RNG"] == "CPU" and given["Hires resize-1"] == 0

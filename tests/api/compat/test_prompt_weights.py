"""A1111's attention syntax parser, on the examples A1111 documents for parse_prompt_attention."""

from __future__ import annotations

import pytest

from service.sampling.prompt_weights import BREAK_FRAGMENT, is_plain, parse

DOCUMENTED = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.1 * 1.1 * 1.3),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.1**4),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize(("prompt", "want"), DOCUMENTED)
def test_documented_examples(prompt: str, want: list[tuple[str, float]]) -> None:
    got = parse(prompt)
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [w for _, w in got] == pytest.approx([w for _, w in want])


@pytest.mark.parametrize(
    ("prompt", "want"),
    [
        ("[faded]", [("faded", 1 / 1.1)]),
        ("[[faded]]", [("faded", 1 / 1.21)]),
        ("(a:1.5) (b:0.25)", [("a", 1.5), (" ", 1.0), ("b", 0.25)]),
        ("(nested (deep:2))", [("nested ", 1.1), ("deep", 2.2)]),
        ("a BREAK b", [("a", 1.0), BREAK_FRAGMENT, ("b", 1.0)]),
        ("a BREAKING b", [("a BREAKING b", 1.0)]),
        ("stray ) and ] stay", [("stray ) and ] stay", 1.0)]),
        ("time: 12:30", [("time: 12:30", 1.0)]),
        ("\\\\ back", [("\\ back", 1.0)]),
        ("", [("", 1.0)]),
    ],
)
def test_more_syntax(prompt: str, want: list[tuple[str, float]]) -> None:
    got = parse(prompt)
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [w for _, w in got] == pytest.approx([w for _, w in want])


def test_plain_prompts() -> None:
    assert is_plain("a red cat, by a window") and not is_plain("a (red) cat") and not is_plain("a \\(cat")

"""`kdiff`: every subcommand's module exists and has the interface the dispatcher calls."""

from __future__ import annotations

import importlib

import pytest

from service.cli import COMMANDS, build_parser


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_parses_its_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    module = importlib.import_module(COMMANDS[command][0])
    assert callable(module.add_arguments) and callable(module.main)
    with pytest.raises(SystemExit) as exit_:
        build_parser([command, "--help"]).parse_args([command, "--help"])
    assert exit_.value.code == 0 and f"kdiff {command}" in capsys.readouterr().out


def test_unknown_command_is_an_error_listing_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser(["bench"]).parse_args(["bench"])
    err = capsys.readouterr().err
    assert "invalid choice" in err and all(name in err for name in COMMANDS)


def test_kdiff_sample_writes_a_png_with_its_parameters(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    from service.cli import main
    from service.images import read_parameters
    from tests.support.tiny_store import make_tiny_store

    store, out = make_tiny_store(tmp_path / "store"), tmp_path / "seven.png"
    argv = ["sample", "--model-store", str(store), "--model", "tiny", "--class-label", "7", "--steps", "3"]
    assert main([*argv, "-o", str(out)]) == 0
    assert Image.open(out).size == (8, 8) and read_parameters(out.read_bytes())["class_label"] == 7
    assert "3 steps" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "nope"], "unknown model 'nope'; valid models: tiny"),
        (["--sampler", "nope"], "unknown sampler 'nope'"),
        (["--steps", "0"], "steps must be an integer in [1, 10000], got 0"),  # was: 0 meant the default
        (["--class-label", "12"], "--class-label must be in [0, 9]"),
    ],
)
def test_kdiff_sample_errors_are_one_line(tmp_path, extra: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    from service.cli import main
    from tests.support.tiny_store import make_tiny_store

    store = make_tiny_store(tmp_path / "store")
    with pytest.raises(SystemExit) as exit_:
        main(
            ["sample", "--model-store", str(store), "--model", "tiny", *extra, "-o", str(tmp_path / "x.png")]
        )
    assert message in str(exit_.value.code)

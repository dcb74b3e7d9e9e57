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

"""`kdiff` command line: serve | sample | train | eval | tune-schedule (benchmarks are scripts in bench/).

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``main(args) -> int``;
modules are imported only when their command is parsed, so `kdiff --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("service.api.cli", "run the HTTP service on the models in the model store"),
    "sample": ("service.serving.cli", "sample images from a model in the store and write a PNG"),
    "train": ("service.training.cli", "train a UNet denoiser (digits or an image folder)"),
    "eval": ("service.training.eval_cli", "evaluate a model: class accuracy and Frechet distance"),
    "tune-schedule": ("service.models.tune_cli", "tune a sampler's schedule to a store model (per NFE)"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdiff", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == wanted:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from service.api.omp import set_wait_policy

    set_wait_policy()  # before a command's module imports torch (service/api/omp.py says why)
    args = build_parser(argv).parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.main(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())

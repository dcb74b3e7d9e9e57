"""What the `kdiff` subcommands (service/cli.py) share in their arguments: the ``--threads`` option
and dataclass configs filled from the parsed arguments of the same names."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")


def set_threads(args: argparse.Namespace) -> None:
    """torch's CPU threads from ``--threads`` (0: torch's default)."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def from_args(cls: type[T], args: argparse.Namespace, **given: Any) -> T:
    """A dataclass ``cls``: the ``given`` fields, the others from the arguments of the same name
    (fields without one keep their defaults)."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return cls(**(values | given))

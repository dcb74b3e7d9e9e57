"""A `kdiff` command for tests/api/test_omp.py: imports torch at module level, as command modules may
(with OMP_DISPLAY_ENV=VERBOSE libgomp prints the settings it read when torch loads it)."""

from __future__ import annotations

import argparse

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def main(args: argparse.Namespace) -> int:
    return 0 if torch.get_num_threads() >= 1 else 1

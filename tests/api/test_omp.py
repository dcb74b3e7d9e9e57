"""OpenMP's wait policy (service/api/omp.py): set before torch loads libgomp, or libgomp never sees it.
What libgomp actually read it prints itself when it loads (OMP_DISPLAY_ENV=VERBOSE)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from service.api.omp import WAIT_POLICY, wait_policy_env

ROOT = Path(__file__).resolve().parents[2]
# `kdiff probe`: a command whose module imports torch at its top, run through the real entry point
VIA_CLI = (
    "import sys, service.cli as c; c.COMMANDS['probe'] = ('tests.support.omp_probe', 'test'); "
    "sys.exit(c.main(['probe']))"
)


def _libgomp_read(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in WAIT_POLICY}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**clean, "OMP_DISPLAY_ENV": "VERBOSE", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stderr


def test_every_kdiff_command_runs_with_the_policy_libgomp_read() -> None:
    read = _libgomp_read(VIA_CLI)
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in read
    assert "GOMP_SPINCOUNT = '300000'" in read


def test_without_it_libgomp_throttles_and_a_users_choice_wins() -> None:
    plain = _libgomp_read("import torch")
    assert "OMP_WAIT_POLICY = 'ACTIVE'" not in plain
    users = _libgomp_read(VIA_CLI, OMP_WAIT_POLICY="PASSIVE")
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in users


def test_ray_engines_get_the_same_environment() -> None:
    for key in WAIT_POLICY:
        os.environ.pop(key, None)
    assert wait_policy_env() == WAIT_POLICY
    os.environ["GOMP_SPINCOUNT"] = "1000"
    try:
        assert wait_policy_env() == {"GOMP_SPINCOUNT": "1000"}  # the user's, unchanged
    finally:
        del os.environ["GOMP_SPINCOUNT"]

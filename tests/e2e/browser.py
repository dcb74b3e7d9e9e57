"""Headless Debian Chromium driven by Playwright's Python API, for the browser tests.

Playwright's own browser download is not used (it fetches from the internet): the tests launch the
distribution's ``chromium`` by path. Missing, the tests fail with the line that installs it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest

INSTALL = "apt-get install -y chromium && .venv/bin/pip install -e '.[dev]'  (or: make setup)"
ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "playground"


def chromium_path() -> str:
    path = os.environ.get("KDIFF_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail(f"the browser tests need Debian's chromium; install it with: {INSTALL}", pytrace=False)
    return path


def artifacts() -> Path:
    """tests/artifacts/playground/, git-ignored by a .gitignore the folder carries."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS.parent / ".gitignore").write_text("*\n")
    return ARTIFACTS


def confine_to_localhost(page) -> list[str]:  # type: ignore[no-untyped-def]
    """Abort every request to a host other than the loopback; returns the list of those blocked."""
    blocked: list[str] = []

    def handle(route) -> None:  # type: ignore[no-untyped-def]
        if urlsplit(route.request.url).hostname in ("127.0.0.1", "localhost"):
            route.continue_()
        elif route.request.url.startswith("data:"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    page.route("**/*", handle)
    return blocked

"""Settings: read from KDIFF_* variables, and every one is documented and passed through by compose."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.api.settings import Settings

REPO = Path(__file__).resolve().parents[2]
VARIABLES = [f"KDIFF_{name.upper()}" for name in Settings.model_fields]


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDIFF_JIT", "false")
    monkeypatch.setenv("KDIFF_MAX_BATCH_ROWS", "32")
    monkeypatch.setenv("KDIFF_MODELS", "digits,sd15")
    s = Settings()
    assert (s.jit, s.max_batch_rows, s.models) == (False, 32, ["digits", "sd15"])


@pytest.mark.parametrize("variable", VARIABLES)
def test_every_setting_is_in_the_readme_table_and_the_compose_file(variable: str) -> None:
    assert f"| `{variable}` |" in (REPO / "README.md").read_text()
    assert f"{variable}:" in (REPO / "docker-compose.yml").read_text()

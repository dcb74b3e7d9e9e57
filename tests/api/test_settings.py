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


def test_an_empty_or_missing_model_store_fails_at_startup(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    for root, why in ((tmp_path / "missing", "does not exist"), (tmp_path, "holds no <name>/manifest.json")):
        with pytest.raises(RuntimeError, match=f"no models to serve.*{why}"):
            with TestClient(create_app(Settings(model_store=root))):
                pass


def test_a_cuda_device_without_cuda_is_a_clear_error() -> None:
    import torch

    if torch.cuda.is_available():
        assert Settings(device="cuda").resolve_device() == "cuda"
    else:
        with pytest.raises(ValueError, match="KDIFF_DEVICE.*sees no CUDA GPU"):
            Settings(device="cuda").resolve_device()
    assert Settings(device="cpu").resolve_device() == "cpu"


@pytest.mark.parametrize(
    ("setting", "device", "bf16", "want"),
    [
        ("auto", "cpu", False, "float32"),
        ("auto", "cuda", True, "bfloat16"),  # Ampere and later
        ("auto", "cuda:1", False, "float16"),  # older GPUs
        ("float32", "cuda", True, "float32"),  # an explicit choice wins
        ("float16", "cpu", False, "float16"),  # (a manifest load still keeps float32 convolutions on CPU)
    ],
)
def test_the_weights_dtype_defaults_to_half_precision_on_a_gpu_only(
    monkeypatch: pytest.MonkeyPatch, setting: str, device: str, bf16: bool, want: str
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert Settings(dtype=setting).resolve_dtype(device) == want

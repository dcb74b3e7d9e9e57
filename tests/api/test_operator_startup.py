"""What an operator sees when `kdiff serve` starts on bad settings or a model store with broken
entries, on the real process: the service serves what works and names what it skipped (log and
GET /models); what it cannot run without stops it with one line, not a traceback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.cli import read_settings
from service.api.settings import Settings
from service.cli import build_parser
from service.serving.errors import StartupError
from tests.support.server import REPO, free_port, running
from tests.support.tiny_store import make_tiny_store

SAMPLE = {"model": "good", "steps": 2, "seed": 1, "class_label": 3}


def _serve(store: Path, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`kdiff serve` expected to exit at start-up: its exit status and what it printed."""
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(free_port()), "--log-level", "warning"]
    full = {**os.environ, "KDIFF_MODEL_STORE": str(store), "KDIFF_TORCH_THREADS": "1", **env}
    return subprocess.run(cmd, cwd=REPO, env=full, capture_output=True, text=True, timeout=timeout)


SHARED = ("loras", "embeddings", "controlnet", "upscalers", "ipadapter", "annotators")


@pytest.fixture(scope="module")
def broken_store() -> Iterator[Path]:
    """A working model, and what operators leave in a store by mistake. In a folder another user can
    read (pytest's own is private to root): the live test serves it as an unprivileged user."""
    root = Path(tempfile.mkdtemp(prefix="kdiff-ops-"))
    make_tiny_store(root, name="good")
    make_tiny_store(root, name="truncated", seed=1)
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])  # an interrupted copy
    make_tiny_store(root, name="empty", seed=2)
    (root / "empty" / "model.safetensors").write_bytes(b"")
    make_tiny_store(root, name="folder", seed=3)
    (root / "folder" / "model.safetensors").unlink()
    (root / "folder" / "model.safetensors").mkdir()  # a directory where the weights file should be
    (root / "badjson").mkdir()
    (root / "badjson" / "manifest.json").write_text('{"kind": "unet",')  # an edit saved half-way
    (root / "nomanifest").mkdir()
    shutil.copy(root / "good" / "model.safetensors", root / "nomanifest")
    shutil.copy(root / "good" / "model.safetensors", root / "stray.safetensors")
    (root / "loop").symlink_to("loop")
    shutil.copytree(root / "good", root / "a model")  # a space: not a model name
    shutil.copytree(root / "good", root / "private")  # copied without `chmod -R a+rX` (README)
    manifest = (root / "good" / "manifest.json").read_text()
    (root / "private" / "manifest.json").write_text(manifest.replace('"good"', '"private"'))
    for name in SHARED:
        (root / name).mkdir()
        (root / name / "x.safetensors").write_bytes(b"")
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
    for name in ("private", *SHARED):
        (root / name).chmod(0o700)
    make_tiny_store(root, name="secret", seed=4)
    (root / "secret" / "model.safetensors").chmod(0o600)  # readable folder, unreadable weights
    yield root
    shutil.rmtree(root)


def _unprivileged() -> list[str]:
    """How the live server runs as a user other than the folders' owner (root reads everything)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")  # util-linux, in Debian's base system
    assert setpriv, "the test needs setpriv (util-linux) to serve as an unprivileged user"
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_a_store_with_broken_entries_serves_the_rest_and_names_each(
    broken_store: Path, tmp_path: Path
) -> None:
    # `KDIFF_MAX_QUEUE=` (an .env line left blank) is the default; a misspelled variable is named
    env = {"KDIFF_MAX_QUEUE": "", "KDIFF_MAX_QUEU": "5", "KDIFF_JIT": "0", "HOME": str(broken_store)}
    with running(broken_store, tmp_path / "log", prefix=_unprivileged(), **env) as server:
        listing = httpx.get(f"{server.url}/models").json()
        states = {m["name"]: m["state"] for m in listing["models"]}
        want = {
            "good": "loaded",
            "truncated": "failed",
            "empty": "failed",
            "folder": "failed",
            "secret": "failed",
        }
        assert states == want
        errors = listing["errors"]
        assert set(errors) == {
            "badjson",
            "nomanifest",
            "stray.safetensors",
            "loop",
            "a model",
            "private",
            *SHARED,
        }
        assert all(
            "cannot be read by the service: Permission denied" in errors[n] for n in ("private", *SHARED)
        )
        assert "manifest.json" in errors["badjson"] and "no manifest.json" in errors["nomanifest"]
        assert "symbolic link" in errors["loop"] and "not a model name" in errors["a model"]
        assert "a model is a folder" in errors["stray.safetensors"]
        failed = {m["name"]: m.get("error", "") for m in listing["models"]}
        assert str(broken_store / "truncated") in failed["truncated"]
        assert "Permission denied" in failed["secret"] and str(broken_store / "secret") in failed["secret"]
        assert (
            f"weights '{broken_store / 'folder' / 'model.safetensors'}' is a folder, not a file"
            in failed["folder"]
        )
        r = httpx.post(f"{server.url}/sample", json=SAMPLE, timeout=60)
        assert r.status_code == 200, r.text  # one broken manifest used to fail every model's load
        r = httpx.post(f"{server.url}/sample", json={**SAMPLE, "model": "nomanifest"}, timeout=60)
        assert r.status_code == 422 and "skipped it: " in r.text and "no manifest.json" in r.text, r.text
        # every route that lists the store's files used to be a 500 (PermissionError), txt2img too
        for path in ("/loras", "/sdapi/v1/loras", "/embeddings", "/sdapi/v1/embeddings", "/object_info"):
            assert httpx.get(f"{server.url}{path}", timeout=30).status_code == 200, path
        for path in ("/controlnet/model_list", "/controlnet/module_list", "/sdapi/v1/upscalers"):
            assert httpx.get(f"{server.url}{path}", timeout=30).status_code == 200, path
        txt2img = {"prompt": "a 3", "steps": 2, "override_settings": {"sd_model_checkpoint": "good"}}
        r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=txt2img, timeout=60)
        assert r.status_code == 200, r.text
        log = server.log_path.read_text()
        for name in errors:
            assert f"skipped {name!r}" in log
        assert "KDIFF_MAX_QUEU is not a setting and is ignored; did you mean KDIFF_MAX_QUEUE?" in log


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"default_model": "truncated"}, "the default model: loading model 'truncated' failed"),
        ({"models": ["good", "nosuch"]}, "model 'nosuch' (KDIFF_MODELS): not in the store"),
        ({"default_model": "badjson"}, "model 'badjson' (KDIFF_DEFAULT_MODEL): "),
        # a budget written in MB instead of bytes: every request without a model would be a 507
        ({"default_model": "good", "memory_budget": 8000}, "the default model: model 'good' needs about"),
    ],
)
def test_a_model_the_settings_need_stops_start_up_naming_why(
    broken_store: Path, settings: dict[str, Any], says: str
) -> None:
    app = create_app(Settings(model_store=broken_store, jit=False, torch_threads=1, **settings))
    with pytest.raises(StartupError) as caught, TestClient(app):
        pass
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_bad_settings_are_one_line_each_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {"KDIFF_MAX_QUEUE": "lots", "KDIFF_DEVICE": "gpu", "KDIFF_MAX_BODY_BYTES": "12"}
    for name, value in {**env, "KDIFF_API_KEYS": "k"}.items():
        monkeypatch.setenv(name, value)
    args = build_parser(["serve"]).parse_args(["serve"])
    assert read_settings(args) is None  # `kdiff serve` exits 2 on it (used to be a pydantic traceback)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "kdiff serve: KDIFF_DEVICE='gpu': must be auto, cpu, cuda, cuda:N (N a GPU index) or mps",
        "kdiff serve: KDIFF_MAX_QUEUE='lots': Input should be a valid integer, unable to parse string as an "
        "integer",
        "kdiff serve: KDIFF_MAX_BODY_BYTES='12': Input should be greater than or equal to 1024",
    ]
    monkeypatch.setenv("KDIFF_API_KEYS", ",")
    monkeypatch.setenv("KDIFF_MAX_QUEUE", "")
    monkeypatch.delenv("KDIFF_DEVICE")
    monkeypatch.delenv("KDIFF_MAX_BODY_BYTES")
    settings = read_settings(args)  # an empty value is the default, as if unset
    assert settings is not None and settings.max_queue == Settings.model_fields["max_queue"].default


def test_the_shipped_default_model_broken_stops_start_up_in_one_line(tmp_path: Path) -> None:
    """No KDIFF_DEFAULT_MODEL: the store's default (the shipped digits) is broken, so every request
    that names no model would fail; the service used to start and answer /readyz 200 anyway (and a
    model it could not start without was a traceback of 80-120 lines)."""
    make_tiny_store(tmp_path, name="digits")
    make_tiny_store(tmp_path, name="other", seed=1)
    (tmp_path / "digits" / "model.safetensors").write_bytes(b"\0" * 64)
    done = _serve(tmp_path, {})
    out = done.stdout + done.stderr
    assert done.returncode == 3 and "Traceback" not in out, out
    line = next(line for line in out.splitlines() if "kdiff serve:" in line)
    assert "cannot start: the default model: loading model 'digits' failed: SafetensorError" in line, out
    assert line.endswith("set KDIFF_DEFAULT_MODEL to another model (loaded: other)"), out


def test_a_folder_the_service_cannot_write_in_stops_start_up(tmp_path: Path) -> None:
    """KDIFF_COMFY_DIR was only used at the first upload or prompt: every ComfyUI request was a 500."""
    (tmp_path / "file").write_text("")
    for setting in ("state_dir", "comfy_dir"):
        with pytest.raises(StartupError, match=f"KDIFF_{setting.upper()}=.*file/x.*Not a directory"):
            Settings(**{setting: str(tmp_path / "file" / "x")}).check_folders()
    Settings(state_dir=str(tmp_path / "new" / "state"), comfy_dir=tmp_path / "comfy").check_folders()
    assert (tmp_path / "new" / "state").is_dir() and (tmp_path / "comfy").is_dir()


def test_a_port_in_use_is_said_before_the_models_load(
    broken_store: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """uvicorn found it only after every model had loaded (minutes for large stores), then exited 3."""
    from service.api import app, cli, malloc

    monkeypatch.setattr(malloc, "cap_arenas", lambda: False)  # this test process's allocator stays as is
    monkeypatch.setattr(malloc, "start_trimming", lambda: None)
    monkeypatch.setenv("KDIFF_MODEL_STORE", str(broken_store))
    monkeypatch.setattr(app, "create_app", lambda *a: pytest.fail("the models would load first"))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        args = build_parser(["serve"]).parse_args(["serve", "--port", str(port)])
        assert cli.main(args) == 2
    assert f"kdiff serve: 127.0.0.1:{port} is in use" in capsys.readouterr().err


def test_kdiff_serve_listens_where_kdiff_host_and_port_say(monkeypatch: pytest.MonkeyPatch) -> None:
    """The image's entrypoint passes them as --host / --port; a bare `kdiff serve` ignored them without
    a word (and, being names the entrypoint reads, they get no unknown-variable warning)."""
    monkeypatch.setenv("KDIFF_HOST", "0.0.0.0")
    monkeypatch.setenv("KDIFF_PORT", "9123")
    args = build_parser(["serve"]).parse_args(["serve"])
    assert (args.host, args.port) == ("0.0.0.0", 9123)
    assert build_parser(["serve"]).parse_args(["serve", "--port", "9"]).port == 9  # the flag wins


def test_a_store_the_service_may_not_list_is_named() -> None:
    """A store mounted without `chmod -R a+rX` (README): start-up said only "PermissionError"."""
    root = Path(tempfile.mkdtemp(prefix="kdiff-ops-"))
    try:
        make_tiny_store(root, name="good")
        root.chmod(0o711 if os.geteuid() == 0 else 0o300)  # enterable, not listable
        scan = f"e = {{}}; ModelStore({str(root)!r}).scan(e); print(e)"
        code = f"from service.models.store import ModelStore; {scan}"
        done = subprocess.run(
            [*_unprivileged(), sys.executable, "-c", code],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert f"{root}: cannot be read by the service: Permission denied" in done.stdout
    finally:
        root.chmod(0o755)
        shutil.rmtree(root)

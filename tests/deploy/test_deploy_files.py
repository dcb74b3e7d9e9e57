"""The deployment files an operator runs but CI cannot (no Docker or Kubernetes here): the Serve config
and the KubeRay manifest's embedded one validate against Serve's own schema and build the application
(its settings checked by Settings), and both compose files hand ./.env's KDIFF_* settings to every
container that runs kdiff."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _serve_configs() -> dict[str, dict[str, Any]]:
    rayservice = yaml.safe_load((REPO / "docker" / "kuberay-rayservice.yaml").read_text())
    return {
        "docker/serve-config.yaml": yaml.safe_load((REPO / "docker" / "serve-config.yaml").read_text()),
        "docker/kuberay-rayservice.yaml": yaml.safe_load(rayservice["spec"]["serveConfigV2"]),
    }


@pytest.mark.parametrize("name", sorted(_serve_configs()))
def test_the_serve_configs_validate_and_build(name: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    from service.deploy.ray_serve import build_app

    config = ServeDeploySchema.model_validate(_serve_configs()[name])
    (app,) = config.applications
    assert app.import_path == "service.deploy.ray_serve:build_app" and app.route_prefix == "/"
    assert build_app(app.args) is not None  # unknown args or invalid settings raise here


def test_both_compose_files_pass_the_env_file_to_every_kdiff_container() -> None:
    """README: settings go in ./.env. docker-compose.ray.yml did not read it: KDIFF_API_KEYS there left
    the Ray deployment open to anyone."""
    for compose in ("docker-compose.yml", "docker-compose.ray.yml"):
        spec = yaml.safe_load((REPO / compose).read_text())
        kdiff = {n: s for n, s in spec["services"].items() if "kdiffusion-service" in str(s.get("image"))}
        assert kdiff, compose
        for name, service in kdiff.items():
            assert {"path": ".env", "required": False} in service.get("env_file", []), (compose, name)


def test_the_ray_head_deploys_the_config_it_mounts() -> None:
    head = yaml.safe_load((REPO / "docker-compose.ray.yml").read_text())["services"]["ray-head"]
    mounts = dict(v.split(":")[:2] for v in head["volumes"])
    assert mounts["./docker/serve-config.yaml"] == "/opt/kdiff/serve-config.yaml"
    assert "serve deploy /opt/kdiff/serve-config.yaml" in " ".join(head["command"])
    assert (REPO / "docker" / "serve-config.yaml").is_file()

"""The deployment files an operator runs but CI cannot (no Docker or Kubernetes here): the Serve config
and the KubeRay manifest's embedded one validate against Serve's own schema and build the application
(its settings checked by Settings), and both compose files hand ./.env's KDIFF_* settings to every
container that runs kdiff."""

from __future__ import annotations

import asyncio
import json
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


def test_a_replica_that_cannot_start_is_one_line_naming_why() -> None:
    """`kdiff serve --ray` on a store whose default model is broken ended in Serve's "Deploying
    application kdiff failed: Failed to update the deployments ['engine0']" traceback (the reason only
    in the replicas' log above it). The messages are what serve.status() held in that run (Ray 2.60)."""
    from service.deploy.cli import deploy_failures

    messages = json.loads((REPO / "tests" / "deploy" / "data" / "deploy_failed_messages.json").read_text())
    assert deploy_failures(messages) == [
        "engine0: the default model: loading model 'digits' failed: SafetensorError: Error while "
        "deserializing header: invalid header length (folder /tmp/h-ops/store2/digits); fix it, or set "
        "KDIFF_DEFAULT_MODEL to another model (loaded: none)"
    ]
    assert deploy_failures({"engine0": "Error:\n  File x\nValueError: bad", "Ingress": ""}) == [
        "engine0: ValueError: bad"
    ]


def test_a_replica_whose_start_failed_shuts_down_quietly() -> None:
    """Serve calls __del__ on a replica whose __init__ raised: it raised AttributeError ('beat')."""
    from service.deploy.ray_serve import EngineReplica

    cls = EngineReplica.func_or_class

    class Unstarted(cls):  # type: ignore[misc, valid-type]
        def __del__(self) -> None:  # (the garbage collector's call, not the one under test)
            pass

    replica = Unstarted.__new__(Unstarted)  # as __init__ left it when create_app or the lifespan raised
    asyncio.run(cls.__del__(replica))

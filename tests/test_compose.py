"""The deployment files, checked statically (no Docker engine here); the e2e tests run the same commands."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_services_share_one_image_and_the_model_store(compose):
    services = compose["services"]
    assert set(services) == {"redis", "api", "worker"}
    api, worker = services["api"], services["worker"]
    assert api["image"] == worker["image"]
    assert "build" in api
    assert api["command"] == ["python", "-m", "app"]
    assert worker["command"][:4] == ["celery", "-A", "worker.celery_app", "worker"]
    assert "--concurrency=1" in worker["command"]
    assert "model_store:/srv/model_store" in api["volumes"]
    assert "model_store:/srv/model_store" in worker["volumes"]
    assert "model_store" in compose["volumes"]


def test_healthchecks_and_start_order(compose):
    services = compose["services"]
    for name, service in services.items():
        assert service["healthcheck"]["test"], name
    assert "/readyz" in " ".join(services["api"]["healthcheck"]["test"])
    assert services["api"]["depends_on"] == {"redis": {"condition": "service_healthy"}}
    assert services["worker"]["depends_on"] == {
        "redis": {"condition": "service_healthy"},
        "api": {"condition": "service_healthy"},
    }


def test_secrets_are_required_from_the_environment(compose):
    text = COMPOSE.read_text()
    assert re.search(r"CAMA_TOKEN: \$\{CAMA_TOKEN:\?[^}]+\}", text)
    assert re.search(r"\$\{REDIS_PASSWORD:\?[^}]+\}", text)
    env = compose["services"]["api"]["environment"]
    assert env["CAMA_ENVIRONMENT"] == "production"  # the settings then refuse a missing/weak token
    assert "--requirepass" in compose["services"]["redis"]["command"]
    assert compose["services"]["worker"]["environment"] == env


def test_dockerfile_one_image_cpu_default_cuda_option():
    text = DOCKERFILE.read_text()
    assert "ARG DEVICE=cpu" in text
    assert 'if [ "$DEVICE" = "cuda" ]' in text
    assert "onnxruntime-gpu" in text
    assert re.search(r"^USER cama$", text, re.M)
    assert "RUN python -m app.seed" in text
    assert 'CMD ["python", "-m", "app"]' in text
    assert "HEALTHCHECK" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "model_store", "models/*.state", ".git"} <= set(ignored)


def docker_compose() -> str | None:
    return shutil.which("docker-compose")


@pytest.mark.skipif(
    docker_compose() is None, reason="docker-compose is not installed (apt-get install docker-compose)"
)
def test_docker_compose_config_accepts_the_file_and_refuses_missing_secrets(tmp_path):
    binary = docker_compose()
    assert binary is not None
    env = {k: v for k, v in os.environ.items() if k not in ("CAMA_TOKEN", "REDIS_PASSWORD")}
    env["DOCKER_CONFIG"] = str(tmp_path)
    ok = subprocess.run(
        [binary, "-f", str(COMPOSE), "config"],
        env={**env, "CAMA_TOKEN": "x" * 32, "REDIS_PASSWORD": "y" * 32},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    resolved = yaml.safe_load(ok.stdout)
    assert resolved["services"]["api"]["environment"]["CAMA_TOKEN"] == "x" * 32
    missing = subprocess.run(
        [binary, "-f", str(COMPOSE), "config"],
        env={**env, "REDIS_PASSWORD": "y" * 32},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode != 0
    assert "CAMA_TOKEN" in missing.stderr

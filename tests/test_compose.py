"""The deployment files, checked statically; ``make compose-smoke`` runs them for real with a Docker engine.

The e2e tests run the same commands as processes.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
SMOKE = ROOT / "scripts" / "compose_smoke.sh"
TRAIN_ONLY = {"foolbox", "matplotlib", "pandas", "pyarrow", "scikit-learn", "tqdm"}


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


def test_every_image_is_built_here_and_the_api_is_published_on_loopback(compose):
    services = compose["services"]
    redis = services["redis"]
    assert redis["build"]["dockerfile"] == "redis.Dockerfile"  # no registry image: Debian's redis-server
    assert (ROOT / redis["build"]["context"] / "redis.Dockerfile").is_file()
    assert redis["image"].startswith("cama-redis:")
    for name in ("redis", "api"):  # one Debian base for both, a local one where no registry answers
        assert "BASE_IMAGE" in services[name]["build"]["args"], name
    # CAMA_PORT set empty (compose_smoke.sh --scale) gives each replica a free host port
    assert services["api"]["ports"] == ["${CAMA_BIND:-127.0.0.1}:${CAMA_PORT-8000}:8000"]


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


def test_the_image_prefers_local_wheels_and_installs_without_the_training_extra():
    text = DOCKERFILE.read_text()
    assert "COPY wheels/ /wheels/" in text
    assert re.search(r"^RUN pip install --find-links /wheels \. ", text, re.M)  # no [train], no [dev]
    assert (ROOT / "wheels" / "README.md").is_file()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {re.split(r"[<>=\[ ]", dep)[0].lower() for dep in project["dependencies"]}
    assert not base & TRAIN_ONLY, base & TRAIN_ONLY
    train = {re.split(r"[<>=\[ ]", dep)[0].lower() for dep in project["optional-dependencies"]["train"]}
    assert train == TRAIN_ONLY
    assert "cama-serve[train]" in project["optional-dependencies"]["dev"]


BLOCK_AND_IMPORT = """
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):  # as in the image, where the [train] extra is not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Absent())
import app.main, worker.tasks
"""


def test_the_service_imports_without_the_training_extra():
    """What the image runs (the API and the worker) must import with matplotlib, pandas, ... absent."""
    code = f"BLOCKED = {sorted(TRAIN_ONLY)!r}\n{BLOCK_AND_IMPORT}"
    env = {**os.environ, "CAMA_REDIS_URL": "redis://127.0.0.1:6379/0"}  # the worker needs one; never used
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    # the blocker itself works: pandas (installed here, with the dev extra) cannot be imported under it
    probe = subprocess.run(
        [sys.executable, "-c", code + "import pandas\n"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert probe.returncode != 0
    assert "No module named 'pandas'" in probe.stderr


def test_compose_smoke_script_builds_runs_and_always_tears_down():
    text = SMOKE.read_text()
    assert subprocess.run(["bash", "-n", str(SMOKE)], check=False).returncode == 0
    assert re.search(r"^trap teardown EXIT$", text, re.M)
    assert "down --volumes --remove-orphans" in text
    assert "scripts/docker_base.sh" in text  # a base built here when no registry answers
    assert "compose build" in text
    assert "compose up -d" in text
    assert re.search(
        r"^compose-smoke:.*\n\t.*scripts/compose_smoke\.sh", (ROOT / "Makefile").read_text(), re.M
    )


def test_the_scaled_run_starts_two_replicas_on_their_own_ports_and_kills_a_worker():
    text = SMOKE.read_text()
    assert re.search(r'--scale "api=\$API_REPLICAS" --scale "worker=\$WORKERS"', text)
    assert 'CAMA_PORT=""' in text  # each replica on a free host port
    assert 'docker port "$id" 8000' in text
    client = (ROOT / "scripts" / "compose_scale.py").read_text()
    assert 'docker("kill", taken)' in client
    assert re.search(
        r"^compose-scale:.*\n\t.*scripts/compose_smoke\.sh --scale", (ROOT / "Makefile").read_text(), re.M
    )


def makefile_commands(target: str) -> list[str]:
    """The recipe lines of one Makefile target, with ``$(BIN)/`` resolved to ``.venv/bin/``."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = lines.index(f"{target}:") + 1
    commands = []
    for line in lines[start:]:
        if not line.startswith("\t"):
            break
        commands.append(line.strip().replace("$(BIN)/", ".venv/bin/"))
    return commands


def test_pre_commit_runs_what_make_lint_and_typecheck_run():
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    hooks = [hook for repo in config["repos"] for hook in repo["hooks"]]
    entries = [shlex.split(hook["entry"]) for hook in hooks]
    for command in makefile_commands("lint") + makefile_commands("typecheck"):
        words = [w for w in shlex.split(command) if w != "."]  # make checks the tree, pre-commit its files
        assert any(entry[: len(words)] == words for entry in entries), command
    assert all(hook["language"] == "system" for hook in hooks)  # the venv's tools, the pinned versions


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
    assert resolved["services"]["api"]["ports"] == ["127.0.0.1:8000:8000/tcp"]
    scaled = subprocess.run(  # an empty CAMA_PORT: a free host port per replica (--scale api=2)
        [binary, "-f", str(COMPOSE), "config"],
        env={**env, "CAMA_TOKEN": "x" * 32, "REDIS_PASSWORD": "y" * 32, "CAMA_PORT": ""},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert yaml.safe_load(scaled.stdout)["services"]["api"]["ports"] == ["127.0.0.1::8000/tcp"]
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

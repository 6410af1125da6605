"""Shared fixtures: a tiny seeded store built once per run, service processes stopped at teardown,
and a Redis key prefix of this run's own (the Redis server is shared)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.processes import ServiceProcess
from harness.stores import clone_store, template_store

REDIS_URL = "redis://127.0.0.1:6379/0"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_template(tmp_path_factory) -> tuple[Path, Path]:
    """(seed dir, store) of the tiny image model, seeded once per test run."""
    return template_store(tmp_path_factory.getbasetemp() / "tiny_template")


@pytest.fixture
def tiny_store(tiny_template, tmp_path) -> Path:
    """A private copy of the tiny store."""
    return clone_store(tiny_template[1], tmp_path / "store")


@pytest.fixture
def redis_prefix() -> str:
    """Keys of this test only."""
    return f"cama-test-{uuid.uuid4().hex[:10]}:"


@pytest.fixture
def start_service(tmp_path) -> Iterator[Callable[..., ServiceProcess]]:
    """Start ``python -m app`` processes (waited ready); all are stopped at teardown."""
    started: list[ServiceProcess] = []

    def start(wait: bool = True, **settings: object) -> ServiceProcess:
        svc = ServiceProcess(tmp_path / f"api-{len(started)}.log", **settings)
        started.append(svc)
        if wait:
            svc.wait_ready()
        return svc

    yield start
    for svc in started:
        svc.stop()


@pytest.fixture
def cama_serve() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``cama-serve ARGS`` (as ``python -m cama_serve``) from the repository root; the result."""

    def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cama_serve", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )

    return run

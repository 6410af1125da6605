"""The layers: the worker and the model store import no web framework; one device resolver and one
atomic write in the repository; no test helpers in the service package."""

from __future__ import annotations

import re
import subprocess
import sys

from harness.processes import ROOT, service_env


def test_the_worker_and_the_store_import_no_fastapi():
    code = (
        "import sys, worker.tasks, store.adaptation, store.artifacts, training.export_model; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'starlette', 'httpx')); "
        "assert not bad, bad"
    )
    env = service_env()  # no CAMA_REDIS_URL: importing the worker needs no broker
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_worker_without_redis_refuses_to_start():
    env = service_env()
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", "solo"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0
    assert "the worker needs CAMA_REDIS_URL" in proc.stdout + proc.stderr


def test_one_resolve_device_and_one_atomic_write():
    defs: dict[str, list[str]] = {"resolve_device": [], "atomic": []}
    for path in ROOT.rglob("*.py"):
        if ".venv" in path.parts:
            continue
        for m in re.finditer(r"^\s*def (resolve_device|atomic\w*)\(", path.read_text(), re.M):
            defs["atomic" if m.group(1).startswith("atomic") else "resolve_device"].append(str(path))
    assert defs == {
        "resolve_device": [str(ROOT / "cama/runtime.py")],
        "atomic": [str(ROOT / "cama/runtime.py")],
    }


def test_no_test_helpers_ship_in_the_service_package():
    assert not (ROOT / "app" / "testing.py").exists()
    shipped = "\n".join(p.read_text() for p in (ROOT / "app").rglob("*.py"))
    assert "import httpx" not in shipped
    assert "benchmarks" not in shipped

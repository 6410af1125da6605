"""Real service processes for the tests and the benchmarks: ``python -m app`` and a Celery worker
on free ports with their logs, the job and version waits, and a client that posts back to back (it
needs the development dependencies: httpx). The service never imports it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from cama import adapt

ROOT = Path(__file__).resolve().parent.parent
# service settings under which the promotion gate accepts every job: for tests of the job path
# with tiny models (the gate itself is tested on its own)
ACCEPTING_GATE: dict[str, Any] = {"gate": {fields[0]: None for fields, _ in adapt.GATE_CHECKS.values()}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_env(**settings: object) -> dict[str, str]:
    """The environment for a service process: ``CAMA_<KEY>`` for each setting, one torch thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAMA_") or k == "CAMA_DATA_DIR"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CAMA_TORCH_THREADS="1")
    for key, value in settings.items():
        if value is not None:
            env[f"CAMA_{key.upper()}"] = value if isinstance(value, str) else _json(value)
    return env


def _json(value: object) -> str:
    return json.dumps(value) if isinstance(value, list | dict | bool) else str(value)


class Process:
    """A child process (API or worker) with its output in a log file; stopped with SIGTERM/SIGKILL."""

    def __init__(self, args: list[str], env: Mapping[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(  # noqa: S603 - fixed interpreter and arguments
            args, env=dict(env), cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


class ServiceProcess(Process):
    """``python -m app`` on a free port."""

    def __init__(self, log_path: Path, **settings: object) -> None:
        self.port = free_port()
        env = service_env(host="127.0.0.1", port=self.port, **settings)
        super().__init__([sys.executable, "-m", "app"], env, log_path)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"service exited:\n{self.logs()[-4000:]}")
            try:
                r = httpx.get(f"{self.url}/readyz", timeout=2.0)
                last = r.json()
                if r.status_code == 200:
                    return dict(r.json())
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.2)
        raise TimeoutError(f"not ready after {timeout}s ({last}):\n{self.logs()[-4000:]}")


class WorkerProcess(Process):
    """``celery -A worker.celery_app worker`` (solo pool, one job at a time)."""

    def __init__(self, log_path: Path, **settings: object) -> None:
        env = service_env(**settings)
        args = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.celery_app",
            "worker",
            "--pool=solo",
            "--concurrency=1",
            "--loglevel=INFO",
            "-Q",
            str(settings.get("queue", "cama")),
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
        super().__init__(args, env, log_path)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"worker exited:\n{self.logs()[-4000:]}")
            if "ready." in self.logs():
                return
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready after {timeout}s:\n{self.logs()[-4000:]}")


def wait_job(client: httpx.Client, job_id: str, timeout: float = 300.0) -> dict[str, Any]:
    """Poll ``GET /jobs/{id}`` until a terminal state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "rejected", "failed", "cancelled"):
            return dict(job)
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} not finished after {timeout}s")


def wait_served(
    client: httpx.Client, body: dict[str, Any], version: int, timeout: float = 60.0
) -> dict[str, Any]:
    """Post ``body`` to ``/predict`` until ``version`` answers it (an activated version is loaded and
    checked beside the old one before the swap); the answer."""
    deadline = time.monotonic() + timeout
    while True:
        answer = dict(client.post("/predict", json=body).json())
        if answer.get("version") == version or time.monotonic() > deadline:
            return answer
        time.sleep(0.2)


class ContinuousClient:
    """A thread that sends ``/predict`` requests back to back and records each answer's version."""

    def __init__(self, url: str, payload: dict[str, object]) -> None:
        self.url, self.payload = url, payload
        self.versions: list[int] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="continuous-client", daemon=True)

    def start(self) -> ContinuousClient:
        self._thread.start()
        return self

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self._stop.is_set():
                try:
                    r = client.post("/predict", json=self.payload)
                except httpx.HTTPError as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                if r.status_code != 200:
                    self.failures.append(f"{r.status_code}: {r.text[:200]}")
                else:
                    self.versions.append(int(r.json()["version"]))

    def wait_for_version(self, version: int, timeout: float = 30.0, *, then: int = 0) -> None:
        """Wait until an answer names ``version``, then for ``then`` more answers (after the swap)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and version not in self.versions[-5:]:
            time.sleep(0.05)
        seen = len(self.versions)
        while time.monotonic() < deadline and len(self.versions) < seen + then:
            time.sleep(0.05)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(60)
        backwards = sum(1 for a, b in zip(self.versions, self.versions[1:], strict=False) if b < a)
        return {
            "requests": len(self.versions) + len(self.failures),
            "failed_requests": len(self.failures),
            "versions": sorted(set(self.versions)),
            "responses_by_version": {v: self.versions.count(v) for v in sorted(set(self.versions))},
            "version_regressions": backwards,
            "failures": self.failures[:5],
        }

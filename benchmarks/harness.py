"""Tiny models, seeded stores, hostile inputs and real service processes, for the tests and the
benchmarks (it needs the development dependencies: httpx). The service never imports it.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image

from cama import adapt
from cama import objectives as O
from cama.checkpoint import save_checkpoint
from cama.config import ImageCamaConfig
from cama.distributions import log_normal, log_standard_normal, reparameterize
from cama.image_model import ImageCama, with_m_pathway
from cama.measurement_model import MeasurementCama, MeasurementCamaConfig
from store.artifacts import seed_store
from store.data import save_serving_data
from store.registry import ModelRegistry

ROOT = Path(__file__).resolve().parent.parent
# service settings under which the promotion gate accepts every job: for tests of the job path
# with tiny models (the gate itself is tested on its own)
ACCEPTING_GATE: dict[str, Any] = {"gate": {fields[0]: None for fields, _ in adapt.GATE_CHECKS.values()}}


def tiny_image_model(seed: int = 0, **config: Any) -> ImageCama:
    """A few-thousand-parameter transform-pathway image CAMA with non-trivial mechanisms."""
    torch.manual_seed(seed)
    model = with_m_pathway(ImageCama(ImageCamaConfig.tiny(**config)), "transform")
    assert model.mechanisms is not None
    with torch.no_grad():
        for p in model.mechanisms.head.parameters():
            p.normal_(0.0, 0.05)
    return model.eval()


def digit_like_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic uint8 ``(n, 28, 28)`` images (a bar whose position encodes the label) and labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n)
    images = np.zeros((n, 28, 28), np.uint8)
    for i, label in enumerate(labels):
        row = 4 + 2 * int(label)
        images[i, row : row + 3, 6:22] = 255
    noise = rng.integers(0, 40, size=images.shape, dtype=np.uint8)
    return np.maximum(images, noise), labels.astype(np.int64)


def make_seed_dir(directory: Path, name: str = "tiny", *, n_replay: int = 64, n_canary: int = 64) -> Path:
    """``<dir>/<name>_cama.pt`` and ``<dir>/<name>_serving_data.npz`` for a tiny image model."""
    directory.mkdir(parents=True, exist_ok=True)
    save_checkpoint(directory / f"{name}_cama.pt", tiny_image_model(), provenance={"dataset": "synthetic"})
    replay = digit_like_images(n_replay, seed=1)
    canary = digit_like_images(n_canary, seed=2)
    save_serving_data(directory / f"{name}_serving_data.npz", replay, canary)
    return directory


def brute_force_log_weights(model: ImageCama, x: torch.Tensor, noise: O.Noise) -> torch.Tensor:
    """Eq. 6 one image, one class and one sample at a time, with no batching: the reference the
    batched ``cama.objectives.bayes_log_weights`` is tested against, ``(B, C)``."""
    k = noise.m.shape[0]
    out = torch.empty(x.shape[0], model.num_classes)
    for b in range(x.shape[0]):
        xb = x[b : b + 1]
        mu_m, lv_m = model.infer_m(xb)
        for c in range(model.num_classes):
            y = torch.nn.functional.one_hot(torch.tensor([c]), model.num_classes).float().view(1, 1, 1, -1)
            terms = []
            for j in range(k):
                m = reparameterize(mu_m, lv_m, noise.m[j, b : b + 1]).view(1, 1, -1)
                ctx = model.prepare(xb, m)
                mu_z, lv_z = model.infer_z(ctx, y)
                z = reparameterize(mu_z, lv_z, noise.z[c, j, b].view(1, 1, 1, -1))
                log_w = (
                    model.log_likelihood(xb, ctx, y, z)
                    - math.log(model.num_classes)
                    + log_standard_normal(z)
                    - log_normal(z, mu_z, lv_z)
                )
                terms.append(log_w.view(()))
            out[b, c] = torch.logsumexp(torch.stack(terms), 0) - math.log(k)
    return out


def check_selective_steps(
    model: ImageCama,
    clean: tuple[torch.Tensor, torch.Tensor],
    test_x: torch.Tensor,
    steps: int,
) -> dict[str, torch.Tensor]:
    """Take ``steps`` eq. 8 steps on the selected (m) parameters and assert that each of them got a
    gradient, at least one moved, and every other parameter has no gradient and did not move;
    returns the state before the steps."""
    before = adapt.snapshot(model)
    selected = {id(p) for p in adapt.collect_params(model)}
    adapt.configure_model(model)
    adapt.check_model(model)
    opt = torch.optim.Adam(adapt.collect_params(model), lr=1e-2)
    for _ in range(steps):
        adapt.finetune_step(model, opt, clean, test_x, alpha=0.5)
    after = model.state_dict()
    for name, p in model.named_parameters():
        if id(p) in selected:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
            assert torch.equal(after[name], before[name]), f"{name} changed"
    moved = [
        n for n, p in model.named_parameters() if id(p) in selected and not torch.equal(after[n], before[n])
    ]
    assert moved, "fine-tuning changed nothing"
    return before


def rgb_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic uint8 ``(n, 3, 32, 32)`` images of two classes (a red or a green square) and labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    images = rng.integers(0, 60, size=(n, 3, 32, 32), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i, int(label), 8:24, 8:24] = 230
    return images, labels.astype(np.int64)


def make_rgb_seed_dir(directory: Path, name: str = "rgb", *, n_replay: int = 64, n_canary: int = 64) -> Path:
    """``<dir>/<name>_cama.pt`` and ``<dir>/<name>_serving_data.npz`` for a tiny 3 x 32 x 32, 2-class
    image model (the shape of ``ImageCamaConfig.cifar_binary``)."""
    directory.mkdir(parents=True, exist_ok=True)
    model = tiny_image_model(channels=3, image_size=32, num_classes=2)
    save_checkpoint(directory / f"{name}_cama.pt", model, provenance={"dataset": "synthetic"})
    save_serving_data(
        directory / f"{name}_serving_data.npz", rgb_images(n_replay, seed=1), rgb_images(n_canary, seed=2)
    )
    return directory


def make_measurement_seed_dir(
    directory: Path, name: str = "meas", *, n: int = 120, adapt_recipe: dict[str, Any] | None = None
) -> Path:
    """A tiny measurement CAMA (5 classes; a, c of 5 and x of 10 dimensions) and its serving data,
    optionally shipped with a fine-tuning recipe (``adapt_recipe`` in its provenance)."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = MeasurementCama(MeasurementCamaConfig.tiny()).eval()
    provenance: dict[str, Any] = {"dataset": "synthetic"}
    if adapt_recipe is not None:
        provenance["adapt_recipe"] = adapt_recipe
    save_checkpoint(directory / f"{name}_cama.pt", model, provenance=provenance)
    rng = np.random.default_rng(0)

    def rows(count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        y = rng.integers(0, 5, size=count)
        a = rng.standard_normal((count, 5)).astype(np.float32) + y[:, None]
        c = rng.standard_normal((count, 5)).astype(np.float32)
        x = rng.standard_normal((count, 10)).astype(np.float32) + y[:, None] - c.mean(1, keepdims=True)
        return a, c, x, y

    ra, rc, rx, ry = rows(n)
    ca, cc, cx, cy = rows(n // 2)
    save_serving_data(
        directory / f"{name}_serving_data.npz", (rx, ry), (cx, cy), replay_cond=(ra, rc), canary_cond=(ca, cc)
    )
    return directory


def mnist_store(root: Path, checkpoint: Path, serving_data: Path) -> ModelRegistry:
    """A store under ``root`` seeded with one MNIST checkpoint and its serving data (linked)."""
    seed_dir = root / "seed"
    seed_dir.mkdir(parents=True)
    (seed_dir / "mnist_cama.pt").symlink_to(checkpoint.resolve())
    (seed_dir / "mnist_serving_data.npz").symlink_to(serving_data.resolve())
    return build_store(root / "store", seed_dir, ["mnist"])


def build_store(store: Path, seed_dir: Path, names: list[str]) -> ModelRegistry:
    """A store seeded from ``seed_dir`` (exports ONNX once per model)."""
    registry = ModelRegistry(store)
    problems = seed_store(registry, names, seed_dir)
    if problems:
        raise RuntimeError(f"seeding failed: {problems}")
    return registry


def template_store(cache: Path, name: str = "tiny") -> tuple[Path, Path]:
    """A seeded tiny store built once per ``cache`` directory; returns (seed dir, store)."""
    seed_dir, store = cache / "seed", cache / "store"
    if not (store / name / "ACTIVE").exists():
        shutil.rmtree(cache, ignore_errors=True)
        make_seed_dir(seed_dir, name)
        build_store(store, seed_dir, [name])
    return seed_dir, store


def clone_store(template: Path, dest: Path) -> Path:
    shutil.copytree(template, dest, ignore=shutil.ignore_patterns(".lock", ".jobs", ".token"))
    return dest


def png_base64(image: np.ndarray) -> str:
    """A ``(28, 28)`` array in [0, 1] as a base64 PNG."""
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.round(image * 255), 0, 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def bomb_png(side: int = 20000) -> bytes:
    """A 1-bit ``side`` x ``side`` PNG of zeros: tens of kilobytes that decode to 400 megapixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + side // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


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

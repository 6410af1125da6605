"""The service adapting from live traffic alone, and routing a mixed stream between its versions.

Part of ``python -m benchmarks.drift`` (sections ``auto_adapt`` and ``routing``).

``auto_adapt``: one real service (``python -m app``, embedded worker, ``CAMA_AUTO_ADAPT=mnist`` and
every other setting at its default) serves ``mnist`` v1. For each MNIST-C corruption, v1 is
activated again, 100 clean images warm the drift test up, then the corruption's adapt half (the
split of :mod:`experiments.evaluate_mnistc`) is posted as ``/predict`` requests of 10 images, nothing
else: no ``/adapt``, no labels. The service raises drift, keeps the unusual inputs and starts one
job when its buffer is full; the gate decides. The version served after that job (v1 when the
gate refused it, when it failed, or when no job started within the adapt half) then scores the
corruption's whole scoring half on the served path (ONNX Runtime, the first-sample screen, default
K). Keys: ``drift.auto_adapt.<corruption>`` and ``drift.auto_adapt.mnistc_mean``, beside
``mnistc.mean.cama_ft.n500`` (``POST /adapt`` on 500 images) and ``drift.auto_adapt.jobs_accepted``.

``routing``: the versions the auto-adapt section published for two corruptions (the two accepted
jobs with the largest held-out ELBO gain, a figure of their own adaptation data), beside v1. A
stream of the scoring halves mixes, in equal thirds and disjoint images, clean digits and the two
corruptions; each input is answered by the version with the highest log p(x)
(:func:`cama.novelty.route`, as ``CAMA_ROUTE_VERSIONS`` serves it). Keys:
``drift.routing.mixed_accuracy`` and ``drift.routing.best_single_accuracy`` (the best of the three
versions answering the whole stream alone).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from app.serving import LoadedVersion, load_version
from cama.novelty import route
from experiments.experiment import halves
from harness.processes import ServiceProcess
from store.data import Inputs
from store.registry import ModelRegistry
from training.data import MNISTC_CORRUPTIONS, Split

TOKEN = "live-adapt-" + "b" * 24
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REQUEST_IMAGES = 10
WARMUP = 100
SCORE_BATCH = 100


@dataclass
class LiveRun:
    corruption: str
    posted: int  # corrupted images posted before a job started (the whole adapt half if none)
    job: dict[str, Any] | None
    version: int  # the version served after it
    accuracy: float
    seconds: float


def log_weights(version: LoadedVersion, x: np.ndarray, k: int, screen: float | None, seed: int) -> np.ndarray:
    """Eq. 6 per-class log-weights on the served path, in batches of ``SCORE_BATCH``."""
    out = []
    for start in range(0, len(x), SCORE_BATCH):
        inputs = Inputs(np.ascontiguousarray(x[start : start + SCORE_BATCH], dtype=np.float32))
        noise = version.noise(len(inputs), k, seed + start)
        out.append(version.log_weights(inputs, noise, "onnx", screen=screen))
    return np.concatenate(out)


def _post(client: httpx.Client, x: np.ndarray, seed: int) -> None:
    """One ``/predict`` request: images ``(N, 1, 28, 28)`` in [0, 1] as 28x28 JSON arrays."""
    images = np.round(x.reshape(len(x), 28, 28), 4).tolist()
    r = client.post("/predict", json={"model": "mnist", "images": images, "seed": seed})
    if r.status_code != 200:
        raise RuntimeError(f"/predict answered {r.status_code}: {r.text[:500]}")


def _wait_version(client: httpx.Client, version: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/models/mnist/drift").json()["version"] != version:
        if time.monotonic() > deadline:
            raise TimeoutError(f"v{version} not served after {timeout}s")
        time.sleep(0.2)


def live_adaptation(
    store: Path,
    log_dir: Path,
    sets: dict[str, Split],
    clean: np.ndarray,
    *,
    k: int,
    screen: float | None,
    threads: int,
    rule: str | None = None,
    job_timeout_s: float = 900.0,
) -> list[LiveRun]:
    """Each corruption's adapt half as live traffic to one service with auto-adapt on (and the
    unusual score's ``rule``, default the service's); each scored."""
    registry = ModelRegistry(store)
    svc = ServiceProcess(
        log_dir / "live_adapt_api.log",
        model_store=str(store),
        models=["mnist"],
        token=TOKEN,
        auto_adapt="mnist",
        auto_adapt_cooldown_s=0,  # corruptions follow one another; a refusal must not hold the next
        torch_threads=threads,
        unusual_rule=rule,
    )
    svc.wait_ready(timeout=300)
    runs: list[LiveRun] = []
    try:
        with httpx.Client(base_url=svc.url, timeout=120, headers=AUTH) as client:
            for corruption, data in sets.items():
                r = client.post("/models/mnist/activate", json={"version": 1})
                r.raise_for_status()
                _wait_version(client, 1)
                adapt_idx, score_idx = halves(data)
                for i in range(0, WARMUP, REQUEST_IMAGES):
                    _post(client, clean[adapt_idx[-WARMUP:]][i : i + REQUEST_IMAGES], seed=i)
                started = time.monotonic()
                job_id, posted = None, 0
                for i in range(0, len(adapt_idx), REQUEST_IMAGES):
                    _post(client, data.x[adapt_idx[i : i + REQUEST_IMAGES]], seed=1000 + i)
                    posted = min(i + REQUEST_IMAGES, len(adapt_idx))
                    job_id = client.get("/models/mnist/drift").json()["auto_job"]
                    if job_id is not None:
                        break
                job = None
                if job_id is not None:
                    deadline = time.monotonic() + job_timeout_s
                    while (job := client.get(f"/jobs/{job_id}").json())["state"] not in (
                        "succeeded",
                        "rejected",
                        "failed",
                        "cancelled",
                    ):
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"job {job_id} not finished after {job_timeout_s}s")
                        time.sleep(0.5)
                version = job["version"] if job is not None and job["version"] is not None else 1
                _wait_version(client, version)
                seconds = time.monotonic() - started
                loaded = load_version(registry, "mnist", version, threads=threads)
                score = Split(data.x[score_idx], data.y[score_idx])
                labels = log_weights(loaded, score.x, k, screen, seed=0).argmax(axis=1)
                run = LiveRun(corruption, posted, job, version, float((labels == score.y).mean()), seconds)
                runs.append(run)
                state = "no job" if job is None else job["state"]
                print(
                    f"{corruption:14s} {posted:5d} posted  job: {state:9s} -> v{version}  "
                    f"accuracy {run.accuracy:.3f}  ({seconds:.0f} s)",
                    flush=True,
                )
    finally:
        svc.stop()
    return runs


def routing(
    store: Path,
    runs: list[LiveRun],
    sets: dict[str, Split],
    clean: Split,
    *,
    k: int,
    screen: float | None,
    threads: int,
) -> dict[str, Any] | None:
    """The mixed stream routed between v1 and two adapted versions, beside each version alone."""

    def gain(run: LiveRun) -> float:
        assert run.job is not None
        m = run.job["metrics"]
        return float(m["heldout_elbo_after"] - m["heldout_elbo_before"])

    accepted = [r for r in runs if r.job is not None and r.job["state"] == "succeeded"]
    if len(accepted) < 2:
        print("routing: fewer than two accepted adaptations; not measured")
        return None
    pair = sorted(accepted, key=gain, reverse=True)[:2]
    registry = ModelRegistry(store)
    numbers = (1, pair[0].version, pair[1].version)
    versions = [load_version(registry, "mnist", v, threads=threads) for v in numbers]
    _, score_idx = halves(clean)
    thirds = np.array_split(score_idx, 3)
    xs = [clean.x[thirds[0]], *(sets[r.corruption].x[t] for r, t in zip(pair, thirds[1:], strict=True))]
    x = np.concatenate(xs)
    y = np.concatenate([clean.y[t] for t in thirds])
    source = np.concatenate([np.full(len(t), i) for i, t in enumerate(thirds)])
    log_ws = [log_weights(v, x, k, screen, seed=0) for v in versions]
    chosen, routed = route(log_ws)
    single = {
        f"v{v.version}": float((w.argmax(axis=1) == y).mean()) for v, w in zip(versions, log_ws, strict=True)
    }
    names = ["clean", pair[0].corruption, pair[1].corruption]
    report = {
        "mix": names,
        "versions": [v.version for v in versions],
        "inputs": len(x),
        "mixed_accuracy": float((routed.argmax(axis=1) == y).mean()),
        "single_accuracy": single,
        "best_single_accuracy": max(single.values()),
        "route_share": {
            names[s]: [float((chosen[source == s] == i).mean()) for i in range(len(versions))]
            for s in range(3)
        },
    }
    print(
        f"routing {names}: routed {report['mixed_accuracy']:.3f}; alone "
        + ", ".join(f"{n} {a:.3f}" for n, a in single.items()),
        flush=True,
    )
    return report


def corruption_sets(images: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, Split]:
    return {c: Split(images[c], labels) for c in MNISTC_CORRUPTIONS}

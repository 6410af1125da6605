"""End to end over HTTP with real processes: vertically shifted MNIST, before and after ``/adapt``.

    python -m benchmarks.e2e_mnist     # models/mnist_cama.pt, both modes, 5000 adapt / 2000 scored
    python -m benchmarks.e2e_mnist --finetune '{"lr": 1e-3, "epochs": 3}'    # another recipe
    python -m benchmarks.e2e_mnist --mode embedded --n-test 2000 --no-metrics     # quicker

The recipe is the model's own (``adapt_recipe`` in its checkpoint) unless ``--finetune`` says
otherwise.

For each mode (``celery``: Redis + a Celery worker + ``python -m app``; ``embedded``: only
``python -m app``) on a fresh copy of the store: shift the first ``--n-test`` MNIST test images
vertically (range 0.3, seeded), predict the second half (its first ``--score-limit``, 2000, images)
over HTTP (accuracy before), post the whole first half unlabelled to ``/adapt`` while a client
sends requests continuously, wait for the job, predict the same images again (accuracy after,
answered by the new version). Then a poisoned batch (uniform noise) must end ``rejected`` with
the served version unchanged.

``--finetune`` becomes the services' recipe overrides (``CAMA_FINETUNE``) and is also sent with
the job.

Writes ``benchmarks/results/e2e_mnist.json`` and, unless ``--no-metrics``, the ``service.e2e.*``,
``service.e2e_embedded.*``, ``service.swap.*`` and ``service.gate.poisoned_rejected`` keys of
``docs/results/metrics.json``. Exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis

from harness.inputs import png_base64
from harness.processes import ContinuousClient, Process, ServiceProcess, WorkerProcess, wait_job
from harness.stores import build_store, clone_store
from training.data import add_data_dir_argument, load_mnist
from training.manipulations import vertical_shift
from training.metrics import update_metrics

RESULTS = Path("benchmarks/results")
TOKEN = "e2e-" + "x" * 28


@dataclass(frozen=True)
class Split:
    """The shifted test images as base64 PNGs: half A (adaptation, unlabelled), half B (evaluation)."""

    adapt: list[str]
    evaluate: list[str]
    labels: np.ndarray


def shifted_test_set(n: int, shift: float, seed: int, data_dir: str | None) -> Split:
    test = load_mnist(data_dir).test
    x = vertical_shift(test.x[:n], shift, np.random.default_rng(seed))  # integer shifts: lossless as PNG
    images = [png_base64(img[0]) for img in x]
    half = n // 2
    return Split(images[:half], images[half:], test.y[half:n])


def limited(split: Split, score_limit: int | None) -> Split:
    """Score on the first ``score_limit`` images of the evaluation half; adapt on the whole other half."""
    if not score_limit:
        return split
    return Split(split.adapt, split.evaluate[:score_limit], split.labels[:score_limit])


def accuracy(
    url: str, name: str, images: list[str], labels: np.ndarray, k: int, chunk: int = 250
) -> tuple[float, set[int]]:
    """Accuracy of ``/predict`` on ``images`` and the versions that answered."""
    predicted: list[int] = []
    versions: set[int] = set()
    with httpx.Client(base_url=url, timeout=1800) as client:
        for start in range(0, len(images), chunk):
            body = {"model": name, "images": images[start : start + chunk], "k": k, "seed": start}
            r = client.post("/predict", json=body)
            r.raise_for_status()
            versions.add(int(r.json()["version"]))
            predicted += [int(p["label"]) for p in r.json()["predictions"]]
    return float((np.asarray(predicted) == labels).mean()), versions


def run_mode(mode: str, template: Path, split: Split, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One mode's before/adapt/after/poisoned sequence on its own copy of the store."""
    store = clone_store(template, work / mode / "store")
    logs = args.log_dir / mode
    logs.mkdir(parents=True, exist_ok=True)
    settings: dict[str, object] = {
        "model_store": str(store),
        "seed_dir": str(work / "seed"),
        "models": [args.name],
        "token": TOKEN,
        "gate": args.gate,
        "torch_threads": args.threads,
        "max_adapt_inputs": max(len(split.adapt), 10),
        "job_timeout_s": args.timeout,
    }
    if args.finetune:
        settings["finetune"] = args.finetune
    processes: list[Process] = []
    namespace = f"cama-e2e-{uuid.uuid4().hex[:8]}"
    if mode == "celery":
        settings.update(redis_url=args.redis_url, redis_prefix=f"{namespace}:", queue=namespace)
        worker = WorkerProcess(logs / "worker.log", **settings)
        processes.append(worker)
        worker.wait_ready(timeout=300)
    api = ServiceProcess(logs / "api.log", **settings)
    processes.append(api)
    try:
        api.wait_ready(timeout=1800)
        return _sequence(api, split, args)
    finally:
        for process in reversed(processes):
            process.stop()
        if mode == "celery":
            client = redis.Redis.from_url(args.redis_url)
            for key in client.scan_iter(match=f"*{namespace}*"):
                client.delete(key)


def _poisoned(client: httpx.Client, args: argparse.Namespace) -> dict[str, Any]:
    """Post ``--poisoned`` uniform-noise images to ``/adapt``; the job and the served version around it."""
    served = int(client.get(f"/models/{args.name}").json()["served_version"])
    noise = np.random.default_rng(args.seed + 1).random((args.poisoned, 28, 28))
    r = client.post("/adapt", json={"model": args.name, "images": [png_base64(img) for img in noise]})
    r.raise_for_status()
    bad = wait_job(client, r.json()["job_id"], timeout=args.timeout)
    return {
        "state": bad["state"],
        "reasons": bad["reasons"],
        "served_before": served,
        "served_after": int(client.get(f"/models/{args.name}").json()["served_version"]),
        "gate": bad["gate"],
        "metrics": bad["metrics"],
    }


def _sequence(api: ServiceProcess, split: Split, args: argparse.Namespace) -> dict[str, Any]:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    t0 = time.monotonic()
    if args.poisoned_only:
        with httpx.Client(base_url=api.url, timeout=600, headers=auth) as client:
            return {"poisoned": _poisoned(client, args), "seconds": round(time.monotonic() - t0, 1)}
    acc_before, before_versions = accuracy(api.url, args.name, split.evaluate, split.labels, args.k)
    (old,) = before_versions
    load = ContinuousClient(api.url, {"model": args.name, "images": split.evaluate[:1], "k": args.k}).start()
    with httpx.Client(base_url=api.url, timeout=600, headers=auth) as client:
        body: dict[str, Any] = {"model": args.name, "images": split.adapt}
        per_job = dict(args.finetune)
        if per_job:
            body["finetune"] = per_job
        r = client.post("/adapt", json=body)
        r.raise_for_status()
        job = wait_job(client, r.json()["job_id"], timeout=args.timeout)
        if job["state"] == "succeeded":
            load.wait_for_version(int(job["version"]), timeout=120, then=args.after_swap)
        swap = load.stop()
        acc_after, after_versions = accuracy(api.url, args.name, split.evaluate, split.labels, args.k)
        poisoned = _poisoned(client, args) if args.poisoned else {}
    new = job.get("version")
    allowed = {old} | ({int(new)} if new is not None else set())
    by_version = swap["responses_by_version"]
    assert isinstance(by_version, dict)
    return {
        "adapt_inputs": len(split.adapt),
        "scored_inputs": len(split.evaluate),
        "acc_before": acc_before,
        "acc_after": acc_after,
        "gain_points": 100 * (acc_after - acc_before),
        "old_version": old,
        "new_version": new,
        "after_versions": sorted(after_versions),
        "job": {k: job[k] for k in ("state", "progress", "metrics", "gate", "reasons", "error", "finetune")},
        "swap": {
            "requests": swap["requests"],
            "failed_requests": swap["failed_requests"],
            # responses naming neither the old nor the new version, plus any answer from an older
            # version after a newer one had been seen
            "mixed_version_responses": sum(n for v, n in by_version.items() if v not in allowed)
            + int(swap["version_regressions"]),
            "version_regressions": swap["version_regressions"],
            "responses_by_version": {str(v): n for v, n in by_version.items()},
        },
        "poisoned": poisoned,
        "seconds": round(time.monotonic() - t0, 1),
    }


def checks(results: dict[str, dict[str, Any]], min_gain: float) -> list[str]:
    """The end-to-end checks (the module docstring); an empty list means all hold."""
    failed = []
    for mode, r in results.items():
        if "job" not in r:  # --poisoned-only
            pass
        elif r["job"]["state"] != "succeeded":
            failed.append(
                f"{mode}: adaptation ended {r['job']['state']} ({r['job']['reasons'] or r['job']['error']})"
            )
        if "job" in r and r["gain_points"] < min_gain:
            failed.append(f"{mode}: accuracy rose {r['gain_points']:.1f} points (< {min_gain})")
        if "job" in r and r["after_versions"] != [r["new_version"]]:
            failed.append(f"{mode}: after-adaptation answers came from {r['after_versions']}")
        if "job" in r and (r["swap"]["failed_requests"] or r["swap"]["mixed_version_responses"]):
            failed.append(f"{mode}: swap saw {r['swap']}")
        p = r["poisoned"]
        if p and (p["state"] != "rejected" or p["served_before"] != p["served_after"]):
            failed.append(
                f"{mode}: poisoned batch ended {p['state']}, served {p['served_before']}->{p['served_after']}"
            )
    return failed


def metrics_of(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    adapted = {mode: r for mode, r in results.items() if "job" in r}
    for mode, prefix in (("celery", "service.e2e"), ("embedded", "service.e2e_embedded")):
        if mode in adapted:
            out[f"{prefix}.acc_before"] = adapted[mode]["acc_before"]
            out[f"{prefix}.acc_after"] = adapted[mode]["acc_after"]
    if adapted:
        out["service.swap.requests"] = sum(r["swap"]["requests"] for r in adapted.values())
        out["service.swap.failed_requests"] = sum(r["swap"]["failed_requests"] for r in adapted.values())
        out["service.swap.mixed_version_responses"] = sum(
            r["swap"]["mixed_version_responses"] for r in adapted.values()
        )
    poisoned = [r["poisoned"] for r in results.values() if r["poisoned"]]
    if poisoned:
        out["service.gate.poisoned_rejected"] = float(
            all(p["state"] == "rejected" and p["served_before"] == p["served_after"] for p in poisoned)
        )
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=Path("models/mnist_cama.pt"))
    parser.add_argument("--serving-data", type=Path, default=Path("models/mnist_serving_data.npz"))
    parser.add_argument(
        "--store", type=Path, default=None, help="start from this store's active version instead"
    )
    parser.add_argument("--name", default="mnist", help="the model's name in the store")
    parser.add_argument(
        "--finetune",
        type=json.loads,
        default={},
        help="recipe overrides (cama.adapt.FinetuneConfig fields) as JSON (default: the model's own)",
    )
    parser.add_argument("--mode", choices=["celery", "embedded", "both"], default="both")
    parser.add_argument(
        "--n-test", type=int, default=10000, help="first N test images; half adapt, half evaluate"
    )
    parser.add_argument(
        "--score-limit", type=int, default=2000, help="score on the first N of the evaluation half (0: all)"
    )
    parser.add_argument("--shift", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=10, help="importance samples per prediction")
    parser.add_argument(
        "--gate",
        type=json.loads,
        default={},
        help="promotion-gate settings over cama.adapt.GateConfig's defaults (JSON; null: a check off)",
    )
    parser.add_argument(
        "--after-swap", type=int, default=300, help="answers the continuous client collects after the swap"
    )
    parser.add_argument(
        "--poisoned", type=int, default=500, help="noise images in the poisoned batch (0: skip)"
    )
    parser.add_argument(
        "--poisoned-only",
        action="store_true",
        help="only the poisoned batch, on the checkpoint's version (a quick check of the gate)",
    )
    parser.add_argument("--min-gain", type=float, default=30.0, help="required accuracy gain in points")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--threads", type=int, default=1, help="torch/ORT threads per service process")
    parser.add_argument("--timeout", type=int, default=7200, help="seconds allowed for one adaptation job")
    add_data_dir_argument(parser)
    parser.add_argument("--log-dir", type=Path, default=Path("logs/e2e_mnist"), help="the services' logs")
    parser.add_argument("--out", type=Path, default=RESULTS / "e2e_mnist.json")
    parser.add_argument("--no-metrics", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    split = limited(shifted_test_set(args.n_test, args.shift, args.seed, args.data_dir), args.score_limit)
    modes = ["celery", "embedded"] if args.mode == "both" else [args.mode]
    with tempfile.TemporaryDirectory(prefix="cama-e2e-") as tmp:
        work = Path(tmp)
        (work / "seed").mkdir()
        if args.store is not None:
            template = clone_store(args.store, work / "template")
        else:
            (work / "seed" / f"{args.name}_cama.pt").symlink_to(args.checkpoint.resolve())
            (work / "seed" / f"{args.name}_serving_data.npz").symlink_to(args.serving_data.resolve())
            template = build_store(work / "template", work / "seed", [args.name]).root
        results = {mode: run_mode(mode, template, split, args, work) for mode in modes}
        shutil.rmtree(work / "template", ignore_errors=True)
    for mode, r in results.items():
        if "job" not in r:
            print(f"{mode:>9}: poisoned: {r['poisoned']['state']} {r['poisoned']['reasons']}")
            continue
        print(
            f"{mode:>9}: accuracy {100 * r['acc_before']:.2f}% -> {100 * r['acc_after']:.2f}% "
            f"(+{r['gain_points']:.1f} points, v{r['old_version']} -> v{r['new_version']}); "
            f"swap: {r['swap']['requests']} requests, {r['swap']['failed_requests']} failed, "
            f"{r['swap']['mixed_version_responses']} mixed; poisoned: {r['poisoned'].get('state', 'skipped')}"
        )
    failed = checks(results, args.min_gain)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.out.write_text(
        json.dumps({"settings": settings, "results": results, "failed": failed}, indent=2) + "\n"
    )
    if not args.no_metrics:
        update_metrics(metrics_of(results))
    if failed:
        raise SystemExit("e2e checks failed:\n  " + "\n  ".join(failed))


if __name__ == "__main__":
    main()

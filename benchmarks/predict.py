"""What a CAMA prediction costs, path by path, and through HTTP (eq. 6's Bayes rule).

    python -m benchmarks.predict                     # models/mnist_cama.pt, 2 threads, every path
    python -m benchmarks.predict --no-http --agreement-limit 2000     # quicker
    python -m benchmarks.predict --calibrate         # the screen's margin, on the validation split

Paths, each given the same importance-sampling noise (drawn from a seed per batch of 100):

- ``eager_fp32``: torch, eager, float32, K samples for every class (``cama.objectives``);
- ``reference``: ONNX Runtime, float32, K samples for every class: the exported graph;
- ``screened``: the same graph behind the first-sample screen
  (``cama.objectives.screened_log_weights``): K = 1 for every input, all K only where the label
  is not settled by ``--screen`` nats;
- ``served``: what ``POST /predict`` runs (``app.serving.LoadedVersion.log_weights`` with the
  service's default settings), measured again under its own name.

Images/s are timed on the first ``--n-speed`` test images (batches of 100); label agreement with
``reference`` and accuracy on the first ``--agreement-limit`` (default all 10,000). The HTTP part
starts ``python -m app`` on loopback with the same threads and measures, with base64 PNGs: one
client sending single images (``perf.http.p99_ms_single``; ``perf.http.p99_ms_single_reference`` the same
against the service without the screen), ``--clients`` client processes sending
single images, and ``--clients`` client processes sending ``--http-batch`` images per request
(``perf.http.img_per_s``); ``perf.http.efficiency`` is that throughput over the served path's
raw images/s, the two timed in turn ``--rounds`` times while the service is up (each ratio from
neighbouring timings, the median reported), so both sides see the machine in the same state
(``perf.http.efficiency_single_images`` the same for single images). The clients run on the same
machine as the server and take CPU from it.

The service's life (``--jobs``, default 20; 0 skips it): a second service, in the embedded mode
``make run`` serves (jobs run in a thread of the API process), is measured fresh and again after
``--jobs`` ``/adapt`` jobs that each fine-tune for ``--job-steps`` steps on ``--job-images`` test
images, pass the gate (the accepting settings of ``harness.processes.ACCEPTING_GATE``: every job
publishes and activates a version) and are waited for one after the other. At both points:
``--clients`` clients sending requests of 1, 32 and 100 images (``perf.http.img_per_s.n<N>.fresh``
/ ``.after_jobs`` and the p99 latencies ``perf.http.p99_ms.n<N>.*``), the efficiency of the
32-image load over the served path's raw images/s on the version being served, timed in turn
``--rounds`` times as above (``perf.http.efficiency_fresh`` / ``perf.http.efficiency_after_jobs``),
and the service's resident memory after that traffic (``perf.rss_mb.fresh`` / ``.after_jobs``).
``--lifetime-only`` measures only this and writes ``benchmarks/results/predict_lifetime.json``.

``--calibrate`` prints, for margins from 0 to 40 nats, how many validation inputs (5% of the
training set, never the test set) the screen answers with one sample and how many of those get
another label than K samples would give: the margin is chosen there.

Writes ``benchmarks/results/predict.json`` and the ``perf.predict.*`` / ``perf.http.*`` keys of
``docs/results/metrics.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from app.serving import LoadedVersion, load_version
from cama.adapt import FinetuneConfig, finetune
from cama.checkpoint import load_checkpoint
from cama.objectives import SCREEN_MARGIN
from cama.runtime import bf16_native
from harness.inputs import png_base64
from harness.processes import ACCEPTING_GATE, ServiceProcess, wait_job
from harness.stores import mnist_store
from store.data import Inputs, ServingData
from store.memory import rss_bytes
from store.registry import ModelRegistry
from training.data import add_data_dir_argument, load_mnist, validation_split
from training.metrics import update_metrics

RESULTS = Path("benchmarks/results")
BATCH = 100
LIFETIME_SIZES = (1, 32, 100)  # images per request measured fresh and after the jobs
TOKEN = "predict-benchmark-Zr8kQ2-vN5pL7xW_cT3mB9"  # noqa: S105 - a loopback service
Path_ = Callable[[Inputs, Any], np.ndarray]


def paths(version: LoadedVersion, screen: float) -> dict[str, Path_]:
    """Every prediction path by name: ``(inputs, noise) -> log-weights (B, C)``."""
    return {
        "eager_fp32": lambda x, n: version.log_weights(x, n, "torch"),
        "reference": lambda x, n: version.log_weights(x, n, "onnx"),
        "screened": lambda x, n: version.log_weights(x, n, "onnx", screen=screen),
        "served": lambda x, n: version.log_weights(x, n, "onnx", screen=SCREEN_MARGIN),
    }


def labels(version: LoadedVersion, run: Path_, x: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Labels for every image, and the seconds the path took (batches of ``BATCH``)."""
    out, seconds = [], 0.0
    for start in range(0, len(x), BATCH):
        inputs = Inputs(x[start : start + BATCH])
        noise = version.noise(len(inputs), k, seed=start)
        t0 = time.perf_counter()
        log_w = run(inputs, noise)
        seconds += time.perf_counter() - t0
        out.append(log_w.argmax(1))
    return np.concatenate(out), seconds


def measure_paths(
    version: LoadedVersion, x: np.ndarray, y: np.ndarray, args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    """Images/s, agreement with ``reference`` and accuracy for each path."""
    runs = paths(version, args.screen)
    for run in runs.values():  # warm-up: sessions, allocators, thread pools
        labels(version, run, x[:BATCH], args.k)
    results: dict[str, dict[str, float]] = {}
    ref_labels = None
    for name in ("reference", *[n for n in runs if n != "reference"]):
        n_agree = (
            args.agreement_limit if name != "eager_fp32" else min(args.agreement_limit, args.eager_limit)
        )
        speed_x = x[: args.n_speed]
        _, seconds = labels(version, runs[name], speed_x, args.k)
        got, _ = labels(version, runs[name], x[:n_agree], args.k)
        if ref_labels is None:
            ref_labels = got
        results[name] = {
            "img_per_s": len(speed_x) / seconds,
            "agreement": float((got == ref_labels[:n_agree]).mean()),
            "accuracy": float((got == y[:n_agree]).mean()),
            "n_agreement": float(n_agree),
        }
        r = results[name]
        print(
            f"{name:12s} {r['img_per_s']:9.1f} img/s  agreement {r['agreement']:.4f}  "
            f"accuracy {r['accuracy']:.4f}  (n={n_agree})",
            flush=True,
        )
    return results


def calibrate(version: LoadedVersion, x: np.ndarray, k: int) -> list[dict[str, float]]:
    """Per margin: the share of inputs the first sample settles and how many of those it gets wrong
    (another label than all K samples give)."""
    first, full = [], []
    for start in range(0, len(x), BATCH):
        inputs = Inputs(x[start : start + BATCH])
        noise = version.noise(len(inputs), k, seed=start)
        full.append(version.log_weights(inputs, noise, "onnx"))
        first.append(version.log_weights(inputs, type(noise)(noise.m[:1], noise.z[:, :1]), "onnx"))
    lw1, lwk = np.concatenate(first), np.concatenate(full)
    top2 = np.sort(lw1, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    changed = lw1.argmax(1) != lwk.argmax(1)
    rows = []
    for m in (0, 2, 5, 8, 10, 12, 15, 20, 25, 30, 40):
        settled = margin >= m
        rows.append(
            {
                "margin": float(m),
                "settled": float(settled.mean()),
                "settled_changed": float((settled & changed).sum()),
                "inputs": float(len(x)),
            }
        )
        print(
            f"margin {m:5.1f}  settled by one sample {settled.mean():.4f}  of those changed by K: "
            f"{int((settled & changed).sum())} / {len(x)}"
        )
    return rows


def adapt_speed(
    version: LoadedVersion, recipe: FinetuneConfig, serving: ServingData, x: np.ndarray, steps: int
) -> dict[str, float]:
    """``POST /adapt``'s fine-tuning steps per second (eq. 8 on the model's recipe's batch size),
    in float32 and, where the CPU computes bfloat16 in hardware, in bfloat16 autocast, on a copy of
    the served model; ``recipe``: what the model's recipe runs on this machine."""
    replay_x, replay_y = torch.from_numpy(serving.replay.x), torch.from_numpy(serving.replay_y)
    test_x = torch.from_numpy(x[: recipe.batch_size * (steps + 2)])
    native = bf16_native(test_x.device)
    out: dict[str, float] = {"bf16_native": float(native)}
    for bf16 in (False, True) if native else (False,):  # emulated bfloat16 is never run
        model = copy.deepcopy(version.model)
        cfg = replace(recipe, bf16=bf16, min_steps=0, epochs=1, max_steps=2)
        finetune(model, replay_x, replay_y, test_x[: 2 * recipe.batch_size], cfg)  # type: ignore[arg-type]
        model = copy.deepcopy(version.model)
        cfg = replace(cfg, max_steps=steps)
        t0 = time.perf_counter()
        report = finetune(model, replay_x, replay_y, test_x, cfg)  # type: ignore[arg-type]
        out["bf16" if bf16 else "fp32"] = report.steps / (time.perf_counter() - t0)
        print(
            f"/adapt steps ({'bf16' if bf16 else 'fp32'}, batch {recipe.batch_size}): "
            f"{out['bf16' if bf16 else 'fp32']:.2f} steps/s",
            flush=True,
        )
    out["recipe"] = out["bf16" if recipe.bf16 and native else "fp32"]
    return out


def _client(url: str, images: list[str], per_request: int, seconds: float, offset: int) -> list[float]:
    """One client process: post ``per_request`` images at a time for ``seconds``; latencies (s)."""
    latencies: list[float] = []
    stop = time.monotonic() + seconds
    j = offset
    with httpx.Client(base_url=url, timeout=120) as c:
        while time.monotonic() < stop:
            batch = [images[(j + i) % len(images)] for i in range(per_request)]
            j += per_request
            t0 = time.perf_counter()
            r = c.post("/predict", json={"model": "mnist", "images": batch})
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                latencies.append(-1.0)  # a failed request
    return latencies


def http_load(
    url: str, images: list[str], clients: int, per_request: int, seconds: float
) -> dict[str, float]:
    """``clients`` processes (no shared interpreter lock with the server or each other) each posting
    ``per_request`` base64 PNGs at a time for ``seconds``: images/s and request latency."""
    t0 = time.monotonic()
    with ProcessPoolExecutor(clients) as pool:
        futures = [
            pool.submit(_client, url, images, per_request, seconds, i * per_request) for i in range(clients)
        ]
        results = [f.result() for f in futures]
    elapsed = time.monotonic() - t0
    ok = np.array([t for r in results for t in r if t >= 0]) * 1000
    failed = sum(1 for r in results for t in r if t < 0)
    return {
        "img_per_s": len(ok) * per_request / elapsed,
        "p50_ms": float(np.percentile(ok, 50)),
        "p99_ms": float(np.percentile(ok, 99)),
        "requests": float(len(ok)),
        "failed": float(failed),
        "clients": float(clients),
        "images_per_request": float(per_request),
    }


def measure_http(
    store: Path, x: np.ndarray, args: argparse.Namespace, log: Path, raw: Callable[[], float]
) -> dict[str, Any]:
    """The service on loopback: one client sending single images (latency), then ``--rounds`` times
    the raw served path (``raw()``, images/s, in this process while the service idles), concurrent
    clients sending single images and concurrent clients sending ``--http-batch`` images per request;
    then one client sending single images to the service without the screen
    (``CAMA_SCREEN_MARGIN=null``: every class gets all K samples, the reference path), the latency
    the screened service is compared with."""
    images = [png_base64(img[0]) for img in x[:512]]
    out: dict[str, Any] = {}
    for screen in ("default", "null"):
        svc = ServiceProcess(
            log.with_name(f"{log.stem}-{screen}{log.suffix}"),
            model_store=str(store),
            seed_dir=str(store / ".none"),
            models=["mnist"],
            torch_threads=args.threads,
            screen_margin=None if screen == "default" else "null",
        )
        try:
            svc.wait_ready(timeout=300)
            http_load(svc.url, images, 1, 1, 3.0)  # warm-up
            if screen == "null":
                out["single_reference"] = http_load(svc.url, images, 1, 1, args.http_seconds)
                continue
            out["single"] = http_load(svc.url, images, 1, 1, args.http_seconds)
            rounds: list[dict[str, Any]] = []
            for _ in range(args.rounds):
                rounds.append(
                    {
                        "raw_img_per_s": raw(),
                        "concurrent_single": http_load(svc.url, images, args.clients, 1, args.http_seconds),
                        "concurrent": http_load(
                            svc.url, images, args.clients, args.http_batch, args.http_seconds
                        ),
                    }
                )
                print(
                    f"round {len(rounds)}: raw {rounds[-1]['raw_img_per_s']:.1f} img/s, HTTP "
                    f"{rounds[-1]['concurrent']['img_per_s']:.1f} img/s",
                    flush=True,
                )
            out["rounds"] = rounds
            for name in ("concurrent_single", "concurrent"):  # the round with the median throughput
                by_speed = sorted(rounds, key=lambda r: r[name]["img_per_s"])
                out[name] = by_speed[len(by_speed) // 2][name]
                out[f"{name}_efficiency"] = float(
                    np.median([r[name]["img_per_s"] / r["raw_img_per_s"] for r in rounds])
                )
        finally:
            svc.stop()
    for name, r in out.items():
        if not isinstance(r, dict) or "clients" not in r:
            continue
        print(
            f"HTTP {name:18s} {int(r['clients'])} client(s) x {int(r['images_per_request'])} image(s): "
            f"{r['img_per_s']:8.1f} img/s  p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms"
            f"  failed {int(r['failed'])}",
            flush=True,
        )
    return out


def _raw_speed(registry: ModelRegistry, x: np.ndarray, args: argparse.Namespace) -> Callable[[], float]:
    """The served path's images/s on the version the store has active (loaded once, here)."""
    active = registry.active("mnist")
    if active is None:
        raise RuntimeError("no active mnist version")
    version = load_version(registry, "mnist", active, threads=args.threads)

    def raw() -> float:
        served = paths(version, args.screen)["served"]
        _, seconds = labels(version, served, x[: args.n_speed], args.k)
        return float(args.n_speed / seconds)

    return raw


def _lifetime_point(
    url: str, pid: int, images: list[str], raw: Callable[[], float], args: argparse.Namespace
) -> dict[str, Any]:
    """Requests of each of ``LIFETIME_SIZES`` images from ``--clients`` clients, the 32-image load
    timed in turn with the raw served path ``--rounds`` times (the efficiency, as the fresh figure),
    then the service's resident memory."""
    http_load(url, images, 1, 1, 3.0)  # warm-up
    out: dict[str, Any] = {"sizes": {}}
    rounds: list[dict[str, Any]] = []
    for n in LIFETIME_SIZES:
        if n != args.http_batch:
            out["sizes"][str(n)] = http_load(url, images, args.clients, n, args.http_seconds)
            continue
        for _ in range(args.rounds):
            rounds.append(
                {"raw_img_per_s": raw(), "load": http_load(url, images, args.clients, n, args.http_seconds)}
            )
        by_speed = sorted(rounds, key=lambda r: r["load"]["img_per_s"])
        out["sizes"][str(n)] = by_speed[len(by_speed) // 2]["load"]
    out["rounds"] = rounds
    out["efficiency"] = float(np.median([r["load"]["img_per_s"] / r["raw_img_per_s"] for r in rounds]))
    out["rss_mb"] = rss_bytes(pid) / 2**20
    for n, r in out["sizes"].items():
        print(
            f"  {int(r['clients'])} client(s) x {n:>3s} image(s): {r['img_per_s']:8.1f} img/s  "
            f"p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms  failed {int(r['failed'])}",
            flush=True,
        )
    print(f"  efficiency {out['efficiency']:.3f}, resident memory {out['rss_mb']:.0f} MB", flush=True)
    return out


def measure_lifetime(
    registry: ModelRegistry,
    x: np.ndarray,
    args: argparse.Namespace,
    log: Path,
    save: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """One embedded-mode service measured fresh, then after ``--jobs`` ``/adapt`` jobs in the same
    process (each published and activated), at both points by :func:`_lifetime_point`, and also
    after each number of jobs in ``--measure-after``; ``save(result so far)`` after each point."""
    images = [png_base64(img[0]) for img in x[:512]]
    finetune = {"max_steps": args.job_steps, "min_steps": 0}
    svc = ServiceProcess(
        log,
        model_store=str(registry.root),
        seed_dir=str(registry.root / ".none"),
        models=["mnist"],
        torch_threads=args.threads,
        token=TOKEN,
        **ACCEPTING_GATE,
    )
    out: dict[str, Any] = {"jobs": args.jobs, "job_images": args.job_images, "job_steps": args.job_steps}
    try:
        svc.wait_ready(timeout=300)
        print("service fresh:", flush=True)
        out["fresh"] = _lifetime_point(svc.url, svc.proc.pid, images, _raw_speed(registry, x, args), args)
        if save is not None:
            save(out)
        job_seconds: list[float] = []
        versions: list[int] = []
        points = sorted({n for n in args.measure_after if 0 < n < args.jobs} | {args.jobs})
        with httpx.Client(base_url=svc.url, timeout=120, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
            for i in range(args.jobs):
                start = (i * args.job_images) % (len(x) - args.job_images)
                batch = [png_base64(img[0]) for img in x[start : start + args.job_images]]
                t0 = time.perf_counter()
                r = c.post("/adapt", json={"model": "mnist", "images": batch, "finetune": finetune})
                r.raise_for_status()
                job = wait_job(c, r.json()["job_id"], timeout=1800)
                job_seconds.append(time.perf_counter() - t0)
                if job["state"] != "succeeded" or job["version"] is None:
                    raise RuntimeError(f"job {i + 1} ended {job['state']}: {job['reasons'] or job['error']}")
                versions.append(int(job["version"]))
                print(f"job {i + 1}/{args.jobs}: v{versions[-1]} in {job_seconds[-1]:.1f} s", flush=True)
                if i + 1 not in points:
                    continue
                deadline = time.monotonic() + 120
                while c.get("/models/mnist").json()["served_version"] != versions[-1]:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"v{versions[-1]} not served after the jobs")
                    time.sleep(0.5)
                print(f"service after {i + 1} jobs (serving v{versions[-1]}):", flush=True)
                point = _lifetime_point(svc.url, svc.proc.pid, images, _raw_speed(registry, x, args), args)
                out["after_jobs" if i + 1 == args.jobs else f"after_{i + 1}_jobs"] = point
                out["job_seconds"], out["versions"] = job_seconds, versions
                if save is not None:
                    save(out)
    finally:
        svc.stop()
    return out


def lifetime_metrics(life: dict[str, Any]) -> dict[str, float]:
    """The ``perf.http.*`` / ``perf.rss_mb.*`` keys of :func:`measure_lifetime`'s result."""
    metrics: dict[str, float] = {}
    for point in ("fresh", "after_jobs"):
        for n, r in life[point]["sizes"].items():
            metrics[f"perf.http.img_per_s.n{n}.{point}"] = r["img_per_s"]
            metrics[f"perf.http.p99_ms.n{n}.{point}"] = r["p99_ms"]
        metrics[f"perf.http.efficiency_{point}"] = life[point]["efficiency"]
        metrics[f"perf.rss_mb.{point}"] = life[point]["rss_mb"]
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=Path("models/mnist_cama.pt"))
    parser.add_argument("--serving-data", type=Path, default=Path("models/mnist_serving_data.npz"))
    add_data_dir_argument(parser)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--screen", type=float, default=SCREEN_MARGIN, help="the screened path's margin")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-speed", type=int, default=1000, help="images timed per path")
    parser.add_argument("--agreement-limit", type=int, default=10000)
    parser.add_argument("--eager-limit", type=int, default=10000, help="agreement images for eager_fp32")
    parser.add_argument("--no-http", action="store_true")
    parser.add_argument("--clients", type=int, default=4, help="concurrent client processes")
    parser.add_argument("--http-batch", type=int, default=32, help="images per request under load")
    parser.add_argument("--http-seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3, help="raw / HTTP timings taken in turn")
    parser.add_argument("--no-adapt", action="store_true", help="skip the fine-tuning step timing")
    parser.add_argument("--adapt-steps", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=20, help="/adapt jobs before the second measurement")
    parser.add_argument("--job-images", type=int, default=100, help="test images per /adapt job")
    parser.add_argument("--job-steps", type=int, default=20, help="fine-tuning steps per /adapt job")
    parser.add_argument(
        "--measure-after", type=int, nargs="*", default=[4, 13], help="also measure after these jobs"
    )
    parser.add_argument("--lifetime-only", action="store_true", help="only the fresh / after-jobs service")
    parser.add_argument("--calibrate", action="store_true")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--no-metrics", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    mnist = load_mnist(args.data_dir)
    with tempfile.TemporaryDirectory(prefix="cama-predict-") as tmp:
        registry = mnist_store(Path(tmp), args.checkpoint, args.serving_data)
        version = load_version(registry, "mnist", 1, threads=args.threads)
        if args.calibrate:
            _, val = validation_split(mnist.train, 0.05, 0)
            rows = calibrate(version, val.x, args.k)
            args.results_dir.mkdir(parents=True, exist_ok=True)
            (args.results_dir / "predict_calibration.json").write_text(json.dumps(rows, indent=2) + "\n")
            return
        if args.lifetime_only:
            args.results_dir.mkdir(parents=True, exist_ok=True)
            target = args.results_dir / "predict_lifetime.json"
            settings = {"k": args.k, "threads": args.threads, "clients": args.clients}

            def save(life: dict[str, Any]) -> None:
                target.write_text(json.dumps({**settings, **life}, indent=2) + "\n")

            life = measure_lifetime(registry, mnist.test.x, args, Path(tmp) / "api-lifetime.log", save)
            life_metrics = lifetime_metrics(life)
            target.write_text(json.dumps({**settings, **life, "metrics": life_metrics}, indent=2) + "\n")
            if not args.no_metrics:
                update_metrics(life_metrics)
            return
        results = measure_paths(version, mnist.test.x, mnist.test.y, args)
        serving = ServingData.load(args.serving_data)
        recipe = FinetuneConfig.from_dict(
            load_checkpoint(args.checkpoint)[1].provenance.get("adapt_recipe") or {}
        )
        adapt = (
            None if args.no_adapt else adapt_speed(version, recipe, serving, mnist.test.x, args.adapt_steps)
        )
        http = None
        if not args.no_http:

            def raw() -> float:
                """The served path's images/s now: the efficiency's denominator."""
                served = paths(version, args.screen)["served"]
                _, seconds = labels(version, served, mnist.test.x[: args.n_speed], args.k)
                return float(args.n_speed / seconds)

            http = measure_http(registry.root, mnist.test.x, args, Path(tmp) / "api.log", raw)
            if args.jobs > 0:
                http["lifetime"] = measure_lifetime(
                    registry, mnist.test.x, args, Path(tmp) / "api-lifetime.log"
                )
    report: dict[str, Any] = {
        "checkpoint": str(args.checkpoint),
        "k": args.k,
        "screen": args.screen,
        "served_screen": SCREEN_MARGIN,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "paths": results,
        "http": http,
        "adapt_steps_per_s": adapt,
    }
    metrics: dict[str, float] = {}
    for name, r in results.items():
        for key in ("img_per_s", "agreement", "accuracy"):
            metrics[f"perf.predict.{name}.{key}"] = r[key]
    metrics["perf.predict.speedup"] = results["served"]["img_per_s"] / results["reference"]["img_per_s"]
    print(f"served / reference: {metrics['perf.predict.speedup']:.2f}x")
    if http is not None:
        metrics["perf.http.img_per_s"] = http["concurrent"]["img_per_s"]
        metrics["perf.http.efficiency"] = http["concurrent_efficiency"]
        metrics["perf.http.img_per_s_single_images"] = http["concurrent_single"]["img_per_s"]
        metrics["perf.http.efficiency_single_images"] = http["concurrent_single_efficiency"]
        metrics["perf.http.p50_ms_single"] = http["single"]["p50_ms"]
        metrics["perf.http.p99_ms_single"] = http["single"]["p99_ms"]
        metrics["perf.http.p50_ms_single_reference"] = http["single_reference"]["p50_ms"]
        metrics["perf.http.p99_ms_single_reference"] = http["single_reference"]["p99_ms"]
        print(f"HTTP efficiency: {metrics['perf.http.efficiency']:.2f}")
        if "lifetime" in http:
            metrics.update(lifetime_metrics(http["lifetime"]))
    if adapt is not None:
        metrics["perf.adapt.steps_per_s"] = adapt["recipe"]
        metrics["perf.adapt.steps_per_s_fp32"] = adapt["fp32"]
        if "bf16" in adapt:
            metrics["perf.adapt.steps_per_s_bf16"] = adapt["bf16"]
    report["metrics"] = metrics
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "predict.json").write_text(json.dumps(report, indent=2) + "\n")
    if not args.no_metrics:
        unmeasured = ("perf.adapt.steps_per_s_bf16",) if adapt and "bf16" not in adapt else ()
        update_metrics(metrics, drop=unmeasured)


if __name__ == "__main__":
    main()

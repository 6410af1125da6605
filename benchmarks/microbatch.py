"""Throughput of single-image concurrent ``/predict`` requests: micro-batching vs one at a time.

    python -m benchmarks.microbatch                          # models/mnist_cama.pt if present
    python -m benchmarks.microbatch --checkpoint models/x.pt --serving-data models/x_data.npz
    python -m benchmarks.microbatch --tiny --requests 400    # the tiny test model

Both services run the same model from the same store, one after the other, as real
``python -m app`` processes; the clients are asyncio tasks each sending one image at a time.
Prints a table, writes ``benchmarks/results/microbatch.json`` and
``service.microbatch.throughput_ratio`` into ``docs/results/metrics.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from app.serving import load_version
from harness.inputs import png_base64
from harness.processes import ServiceProcess
from harness.stores import build_store, make_seed_dir
from store.data import Inputs, ServingData
from store.registry import ModelRegistry
from training.metrics import update_metrics

RESULTS = Path("benchmarks/results")


def prepare_store(args: argparse.Namespace, work: Path) -> tuple[Path, Path, str, np.ndarray]:
    """A store holding the benchmarked model (ONNX exported once) and a pool of test images."""
    seed_dir = work / "seed"
    if args.store is not None:  # an existing store: its active version of --model
        registry = ModelRegistry(args.store)
        active = registry.active(args.model)
        if active is None:
            raise SystemExit(f"{args.model} has no active version in {args.store}")
        images = ServingData.load(registry.version_dir(args.model, active) / "replay.npz").canary.x[:, 0]
        return args.store, seed_dir, args.model, images
    name = "bench"
    if args.tiny:
        make_seed_dir(seed_dir, name)
    else:
        seed_dir.mkdir(parents=True)
        (seed_dir / f"{name}_cama.pt").symlink_to(args.checkpoint.resolve())
        (seed_dir / f"{name}_serving_data.npz").symlink_to(args.serving_data.resolve())
    store = work / "store"
    build_store(store, seed_dir, [name])
    images = ServingData.load(seed_dir / f"{name}_serving_data.npz").canary.x[:, 0]
    return store, seed_dir, name, images


async def load(
    url: str, model: str, images: list[str], requests: int, concurrency: int, k: int
) -> dict[str, Any]:
    """``requests`` single-image requests from ``concurrency`` clients; throughput and latencies."""
    latencies: list[float] = []
    failures = 0
    counter = iter(range(requests))

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal failures
        for i in counter:
            t0 = time.perf_counter()
            r = await http.post(
                "/predict", json={"model": model, "images": [images[i % len(images)]], "k": k, "seed": i}
            )
            latencies.append(time.perf_counter() - t0)
            failures += r.status_code != 200

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        for _ in range(2):  # warm-up
            await http.post("/predict", json={"model": model, "images": [images[0]], "k": k})
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {
        "requests": requests,
        "failed": failures,
        "seconds": round(elapsed, 3),
        "throughput_rps": round(requests / elapsed, 2),
        "latency_p50_ms": round(1000 * statistics.median(latencies), 1),
        "latency_p95_ms": round(1000 * float(np.percentile(latencies, 95)), 1),
    }


def batch_sizes(url: str, model: str) -> float:
    """Mean inputs per forward pass, from the service's own histogram."""
    text = httpx.get(f"{url}/metrics").text
    values = {}
    for line in text.splitlines():
        for stat in ("sum", "count"):
            if line.startswith(f"cama_batch_inputs_{stat}") and f'model="{model}"' in line:
                values[stat] = float(line.rsplit(" ", 1)[1])
    return round(values.get("sum", 0.0) / max(values.get("count", 1.0), 1.0), 2)


def forward_scaling(store: Path, name: str, images: np.ndarray, k: int, threads: int) -> dict[str, float]:
    """Milliseconds per image of one ONNX Runtime forward pass, by batch size, in this process.

    Micro-batching can only raise throughput where a pass over B inputs costs less than B passes
    over one (fixed per-pass overhead, parallel hardware); this measures that for the served graph.
    """
    registry = ModelRegistry(store)
    version = load_version(registry, name, registry.active(name) or 1, threads=threads)
    out: dict[str, float] = {}
    for batch in (1, 4, 16, 64):
        inputs = Inputs(images[:batch, None].astype(np.float32))
        noise = version.noise(batch, k, seed=batch)
        version.log_weights(inputs, noise)  # warm-up
        repeats = max(2, 64 // batch)
        t0 = time.perf_counter()
        for _ in range(repeats):
            version.log_weights(inputs, noise)
        out[str(batch)] = round(1000 * (time.perf_counter() - t0) / (repeats * batch), 2)
    return out


def run_mode(
    store: Path, seed_dir: Path, name: str, images: list[str], args: argparse.Namespace, batching: bool
) -> dict[str, Any]:
    args.log_dir.mkdir(parents=True, exist_ok=True)
    log = args.log_dir / f"microbatch_{'on' if batching else 'off'}.log"
    service = ServiceProcess(
        log,
        model_store=str(store),
        seed_dir=str(seed_dir),
        models=[name],
        token="b" * 24,
        batching=batching,
        batch_max_inputs=args.max_batch,
        batch_max_wait_ms=args.max_wait_ms,
        torch_threads=args.threads,
    )
    try:
        service.wait_ready(timeout=600)
        result = asyncio.run(load(service.url, name, images, args.requests, args.concurrency, args.k))
        result["mean_batch_inputs"] = batch_sizes(service.url, name)
        return result
    finally:
        service.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=Path("models/mnist_cama.pt"))
    parser.add_argument("--serving-data", type=Path, default=Path("models/mnist_serving_data.npz"))
    parser.add_argument("--tiny", action="store_true", help="benchmark the tiny test model instead")
    parser.add_argument(
        "--store", type=Path, default=None, help="serve the active --model of this store instead"
    )
    parser.add_argument("--model", default="mnist")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1, help="torch/ORT threads of the service")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--log-dir", type=Path, default=Path("logs"), help="the services' logs")
    parser.add_argument("--no-metrics", action="store_true", help="do not write docs/results/metrics.json")
    args = parser.parse_args(argv)
    if not args.tiny and args.store is None and not args.checkpoint.exists():
        parser.error(f"{args.checkpoint} does not exist (use --tiny or --checkpoint)")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cama-bench-") as tmp:
        store, seed_dir, name, pool = prepare_store(args, Path(tmp))
        images = [png_base64(img) for img in pool[:256]]
        results = {
            mode: run_mode(store, seed_dir, name, images, args, mode == "batched")
            for mode in ("batched", "one_at_a_time")
        }
        scaling = forward_scaling(store, name, pool, args.k, args.threads)
    ratio = results["batched"]["throughput_rps"] / results["one_at_a_time"]["throughput_rps"]
    print(f"\n{'mode':<15}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'inputs/pass':>13}{'failed':>8}")
    for mode, r in results.items():
        print(
            f"{mode:<15}{r['throughput_rps']:>9}{r['latency_p50_ms']:>9}{r['latency_p95_ms']:>9}{r['mean_batch_inputs']:>13}{r['failed']:>8}"
        )
    print(f"throughput ratio (batched / one at a time): {ratio:.2f}")
    per_image = ", ".join(f"{b}: {v}" for b, v in scaling.items())
    print(f"one forward pass, ms per image by batch size: {per_image}")
    report = {
        "model": "tiny" if args.tiny else str(args.store or args.checkpoint),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "results": results,
        "throughput_ratio": round(ratio, 3),
        "forward_ms_per_image_by_batch": scaling,
    }
    (args.results_dir / "microbatch.json").write_text(json.dumps(report, indent=2) + "\n")
    if any(r["failed"] for r in results.values()):
        raise SystemExit("some requests failed")
    if args.tiny or args.store is not None:
        print("(not written to docs/results/metrics.json: only the committed MNIST checkpoint's figure is)")
    elif not args.no_metrics:
        update_metrics({"service.microbatch.throughput_ratio": round(ratio, 3)})


if __name__ == "__main__":
    main()

"""ONNX Runtime vs the torch reference on one model version, given the same noise (eq. 6 log-weights).

    python -m benchmarks.onnx_vs_torch                      # exports models/mnist_cama.pt to a temp store
    python -m benchmarks.onnx_vs_torch --store model_store --model mnist   # the active version there
    python -m benchmarks.onnx_vs_torch --tiny

Reports the largest absolute difference of the per-class log-weights (nats), label agreement and
time per batch on each path; writes ``benchmarks/results/onnx_vs_torch.json`` and
``service.onnx_vs_torch.max_abs_diff`` into ``docs/results/metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.serving import LoadedVersion, load_version
from harness.stores import build_store, make_seed_dir
from store.data import ServingData
from store.registry import ModelRegistry
from training.metrics import update_metrics

RESULTS = Path("benchmarks/results")


def compare(version: LoadedVersion, data: ServingData, n: int, ks: list[int], batch: int) -> dict[str, Any]:
    """Max |ONNX - torch| over ``n`` canary inputs for each K, with timings."""
    rows: list[dict[str, Any]] = []
    inputs = data.canary.take(slice(0, n))
    for k in ks:
        worst, agree, t_onnx, t_torch = 0.0, 0, 0.0, 0.0
        for start in range(0, len(inputs), batch):
            part = inputs.take(slice(start, start + batch))
            noise = version.noise(len(part), k, seed=start + k)
            t0 = time.perf_counter()
            onnx_w = version.log_weights(part, noise, "onnx")
            t1 = time.perf_counter()
            torch_w = version.log_weights(part, noise, "torch")
            t2 = time.perf_counter()
            t_onnx, t_torch = t_onnx + t1 - t0, t_torch + t2 - t1
            worst = max(worst, float(np.abs(onnx_w - torch_w).max()))
            agree += int((onnx_w.argmax(1) == torch_w.argmax(1)).sum())
        rows.append(
            {
                "k": k,
                "inputs": len(inputs),
                "max_abs_diff": worst,
                "label_agreement": agree / len(inputs),
                "onnx_seconds": round(t_onnx, 3),
                "torch_seconds": round(t_torch, 3),
            }
        )
    return {"per_k": rows, "max_abs_diff": max(r["max_abs_diff"] for r in rows)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=Path("models/mnist_cama.pt"))
    parser.add_argument("--serving-data", type=Path, default=Path("models/mnist_serving_data.npz"))
    parser.add_argument(
        "--store", type=Path, default=None, help="use the active version of --model in this store"
    )
    parser.add_argument("--model", default="mnist")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--n", type=int, default=256, help="canary inputs compared")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--no-metrics", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="cama-parity-") as tmp:
        if args.store is not None:
            registry, name = ModelRegistry(args.store), args.model
        else:
            name, seed_dir = "parity", Path(tmp) / "seed"
            if args.tiny:
                make_seed_dir(seed_dir, name)
            else:
                if not args.checkpoint.exists():
                    parser.error(f"{args.checkpoint} does not exist (use --tiny, --store or --checkpoint)")
                seed_dir.mkdir()
                (seed_dir / f"{name}_cama.pt").symlink_to(args.checkpoint.resolve())
                (seed_dir / f"{name}_serving_data.npz").symlink_to(args.serving_data.resolve())
            registry = build_store(Path(tmp) / "store", seed_dir, [name])
        active = registry.active(name)
        if active is None:
            parser.error(f"{name} has no active version in {registry.root}")
        version = load_version(registry, name, active, threads=args.threads)
        data = ServingData.load(registry.version_dir(name, active) / "replay.npz")
        result = compare(version, data, args.n, args.k, args.batch)
    print(f"{'K':>4}{'inputs':>8}{'max |diff| (nats)':>20}{'labels agree':>14}{'onnx s':>9}{'torch s':>9}")
    for r in result["per_k"]:
        print(
            f"{r['k']:>4}{r['inputs']:>8}{r['max_abs_diff']:>20.5f}{r['label_agreement']:>14.4f}"
            f"{r['onnx_seconds']:>9}{r['torch_seconds']:>9}"
        )
    args.results_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "model": "tiny" if args.tiny else str(args.store or args.checkpoint),
        "tolerance_nats": 0.05,
        **result,
    }
    (args.results_dir / "onnx_vs_torch.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.tiny:
        print("(tiny model: not written to docs/results/metrics.json)")
    elif not args.no_metrics:
        update_metrics({"service.onnx_vs_torch.max_abs_diff": result["max_abs_diff"]})


if __name__ == "__main__":
    main()

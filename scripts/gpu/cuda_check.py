"""The serving core on a GPU: eq. 6 log-weights on CUDA against the CPU, and their speed per batch.

    python scripts/gpu/cuda_check.py --out benchmarks/results/cuda_check.json      # on a CUDA machine
    python scripts/gpu/cuda_check.py --device cpu --batches 1 8 --repeats 1 --out /tmp/c.json  # a check

Both devices get the same explicit noise (``cama.objectives.sample_noise`` on the CPU), so the
difference is the devices' arithmetic only. Times are the median of ``--repeats`` synchronised
passes at K=10, in float32 and under bf16 autocast. Also records the peak GPU memory and which
ONNX Runtime execution providers are installed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from cama.checkpoint import load_checkpoint
from cama.image_model import ImageCama
from cama.objectives import Noise, bayes_log_weights, sample_noise


def log_weights(model: ImageCama, x: torch.Tensor, noise: Noise, bf16: bool) -> torch.Tensor:
    """Eq. 6's per-class log-weights ``(B, C)`` on ``x``'s device, optionally under bf16 autocast."""
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        return bayes_log_weights(model, x, noise=noise).float()


def load(path: Path, device: torch.device) -> ImageCama:
    """The image CAMA of a checkpoint, in eval mode on ``device``."""
    model, _ = load_checkpoint(path, map_location=device)
    if not isinstance(model, ImageCama):
        raise SystemExit(f"{path} is not an image CAMA checkpoint")
    return model.eval()


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(model: ImageCama, x: torch.Tensor, noise: Noise, bf16: bool, repeats: int) -> float:
    """Median milliseconds of one synchronised pass (after one warm-up pass)."""
    log_weights(model, x, noise, bf16)
    sync(x.device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        log_weights(model, x, noise, bf16)
        sync(x.device)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Compare with the CPU on ``--compare`` canary images, then time each batch size."""
    device = torch.device(args.device)
    cpu_model, model = load(args.checkpoint, torch.device("cpu")), load(args.checkpoint, device)
    canary = np.load(args.serving_data)["canary_x"].astype(np.float32) / 255.0  # (N, 28, 28)
    images = torch.from_numpy(canary[:, None])  # (N, 1, 28, 28)
    generator = torch.Generator().manual_seed(0)
    x = images[: args.compare]
    noise = sample_noise(cpu_model, len(x), args.k, generator=generator)
    reference = log_weights(cpu_model, x, noise, bf16=False)
    moved = Noise(m=noise.m.to(device), z=noise.z.to(device))
    on_device = log_weights(model, x.to(device), moved, bf16=False).cpu()
    prefix = device.type
    report: dict[str, Any] = {
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        f"{prefix}_vs_cpu_fp32_max_abs_diff_nats": float((on_device - reference).abs().max()),
        f"{prefix}_vs_cpu_same_labels": bool((on_device.argmax(1) == reference.argmax(1)).all()),
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for batch in args.batches:
        xb = images[torch.arange(batch) % len(images)].to(device)
        nb = sample_noise(
            model, batch, args.k, generator=torch.Generator(device).manual_seed(1), device=device
        )
        for name, bf16 in (("fp32", False), ("bf16", True)):
            ms = timed(model, xb, nb, bf16, args.repeats)
            report[f"{prefix}_{name}_batch{batch}_ms"] = round(ms, 3)
            report[f"{prefix}_{name}_batch{batch}_images_per_s"] = round(batch / ms * 1000, 1)
    if device.type == "cuda":
        report["cuda_peak_mem_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    report["ort_version"] = ort.__version__
    report["ort_providers"] = ort.get_available_providers()
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--checkpoint", type=Path, default=Path("models/mnist_cama.pt"))
    parser.add_argument("--serving-data", type=Path, default=Path("models/mnist_serving_data.npz"))
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--compare", type=int, default=64, help="canary images compared with the CPU")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256, 512])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cuda_check.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

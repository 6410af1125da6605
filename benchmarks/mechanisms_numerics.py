"""The transform pathway's numerics: the core's written-out forms against torch's own, float32 and float64.

    python -m benchmarks.mechanisms_numerics            # models/mnist_cama.pt, 256 canary inputs, K=10

``cama.mechanisms`` computes the warp's sampling grid as explicit multiply-adds on exact
pixel-centre constants (instead of ``F.affine_grid``) and the Bernoulli mean as ``exp(-|l|)`` ratios
(instead of ``torch.sigmoid``), so that ONNX Runtime and torch run the same arithmetic. The two forms
are the same mathematics; this script shows it on the real model: eq. 6 log-weights (explicit
noise) from both forms, in float32 and float64. Writes
``benchmarks/results/mechanisms_numerics.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cama import image_model, mechanisms
from cama.checkpoint import load_checkpoint
from cama.export import folded_log_weights
from store.data import ServingData

RESULTS = Path("benchmarks/results")


def previous_resample(img: Tensor, affine: Tensor) -> Tensor:
    """The warp as it was: ``F.affine_grid`` + ``F.grid_sample``."""
    grid = F.affine_grid(affine, list(img.shape), align_corners=False)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@contextmanager
def previous_form() -> Iterator[None]:
    """Swap the previous warp and Bernoulli mean into the core for the duration."""
    patches: list[tuple[object, str, object]] = [
        (mechanisms, "_resample", previous_resample),
        (mechanisms, "bernoulli_mean", torch.sigmoid),
        (image_model, "bernoulli_mean", torch.sigmoid),
    ]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    for module, name, value in patches:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


@contextmanager
def precision(dtype: torch.dtype) -> Iterator[None]:
    """Run the model in ``dtype``: the core casts to float32 in places (``.float()``), made a no-op."""
    default, to_float = torch.get_default_dtype(), torch.Tensor.float
    torch.set_default_dtype(dtype)
    if dtype == torch.float64:
        torch.Tensor.float = lambda self, *a, **kw: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.set_default_dtype(default)
        torch.Tensor.float = to_float  # type: ignore[method-assign]


def log_weights(
    model: nn.Module, x: Tensor, noise_m: Tensor, noise_z: Tensor, dtype: torch.dtype, chunk: int
) -> np.ndarray:
    model = model.to(dtype)
    out = []
    with precision(dtype), torch.no_grad():
        for s in range(0, x.shape[0], chunk):
            part = folded_log_weights(
                model,
                x[s : s + chunk].to(dtype),
                (),
                noise_m[:, s : s + chunk].to(dtype),
                noise_z[:, :, s : s + chunk].to(dtype),
            )
            out.append(part.double())
    return torch.cat(out).numpy()


def softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(1, keepdims=True))
    return np.asarray(e / e.sum(1, keepdims=True))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=Path("models/mnist_cama.pt"))
    parser.add_argument("--serving-data", type=Path, default=Path("models/mnist_serving_data.npz"))
    parser.add_argument("--n", type=int, default=256, help="canary inputs")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "mechanisms_numerics.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _ = load_checkpoint(args.checkpoint)
    x = torch.from_numpy(ServingData.load(args.serving_data).canary.x[: args.n])
    gen = torch.Generator().manual_seed(0)
    dim_m, dim_z, classes = (int(getattr(model, a)) for a in ("dim_m", "dim_z", "num_classes"))
    noise_m = torch.randn(args.k, len(x), dim_m, generator=gen)
    noise_z = torch.randn(classes, args.k, len(x), dim_z, generator=gen)
    runs: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    forms: dict[str, Callable[[], Any]] = {"previous": previous_form, "current": nullcontext}
    for form, ctx in forms.items():
        for dtype in (torch.float32, torch.float64):
            key = f"{form}_{str(dtype).removeprefix('torch.')}"
            t0 = time.perf_counter()
            with ctx():
                runs[key] = log_weights(model, x, noise_m, noise_z, dtype, args.chunk)
            seconds[key] = round(time.perf_counter() - t0, 2)
            print(f"{key}: {seconds[key]} s", flush=True)
    p32, c32, p64, c64 = (
        runs[k] for k in ("previous_float32", "current_float32", "previous_float64", "current_float64")
    )
    report = {
        "checkpoint": str(args.checkpoint),
        "inputs": len(x),
        "k": args.k,
        "log_weight_magnitude_max": float(np.abs(c64).max()),
        "float64_previous_vs_current_max_abs": float(np.abs(p64 - c64).max()),
        "float32_previous_vs_current_max_abs": float(np.abs(p32 - c32).max()),
        "float32_previous_vs_current_max_rel": float((np.abs(p32 - c32) / np.abs(c64)).max()),
        "float32_previous_vs_current_max_prob_diff": float(np.abs(softmax(p32) - softmax(c32)).max()),
        "float32_previous_vs_current_labels_identical": bool((p32.argmax(1) == c32.argmax(1)).all()),
        "float32_previous_vs_float64_max_abs": float(np.abs(p32 - p64).max()),
        "float32_current_vs_float64_max_abs": float(np.abs(c32 - c64).max()),
        "seconds": seconds,
    }
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

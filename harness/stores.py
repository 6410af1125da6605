"""Tiny models, their seed directories and seeded model stores, for the tests and the benchmarks."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cama.checkpoint import save_checkpoint
from cama.config import ImageCamaConfig
from cama.image_model import ImageCama, with_m_pathway
from cama.measurement_model import MeasurementCama, MeasurementCamaConfig
from harness.inputs import digit_like_images, rgb_images
from store.artifacts import seed_store
from store.data import save_serving_data
from store.registry import ModelRegistry


def tiny_image_model(seed: int = 0, **config: Any) -> ImageCama:
    """A few-thousand-parameter transform-pathway image CAMA with non-trivial mechanisms."""
    torch.manual_seed(seed)
    model = with_m_pathway(ImageCama(ImageCamaConfig.tiny(**config)), "transform")
    assert model.mechanisms is not None
    with torch.no_grad():
        for p in model.mechanisms.head.parameters():
            p.normal_(0.0, 0.05)
    return model.eval()


def make_seed_dir(directory: Path, name: str = "tiny", *, n_replay: int = 64, n_canary: int = 64) -> Path:
    """``<dir>/<name>_cama.pt`` and ``<dir>/<name>_serving_data.npz`` for a tiny image model."""
    directory.mkdir(parents=True, exist_ok=True)
    save_checkpoint(directory / f"{name}_cama.pt", tiny_image_model(), provenance={"dataset": "synthetic"})
    replay = digit_like_images(n_replay, seed=1)
    canary = digit_like_images(n_canary, seed=2)
    save_serving_data(directory / f"{name}_serving_data.npz", replay, canary)
    return directory


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

"""Export a checkpoint into the service's model registry, and build the serving data it ships with.

    python -m training.export_model --checkpoint models/mnist_cama.pt --name mnist --store model_store
    python -m training.export_model --make-serving-data mnist --out models/mnist_serving_data.npz
    python -m training.export_model --make-serving-data cifar_binary   # models/cifar_binary_serving_data.npz
    python -m training.export_model --checkpoint models/mine.pt --name mine --store model_store

A registry version holds the core checkpoint, its ONNX export (eq. 6 with explicit noise) and
``replay.npz``: labelled clean replay data for eq. 8's clean term and a labelled clean canary
set for the promotion gate. For the image data sets (MNIST, CIFAR-binary) these come from the
training set (replay) and the 5% validation split (canary) of ``training.train_cama``; the
committed ``models/<name>_serving_data.npz`` (uint8) means the service needs no dataset at run time.
A model trained on a user's own images (``--data``) records where they came from and how they were
read; its serving data is built from them the same way (the validation split of its training run
as the canary) when ``<checkpoint dir>/<name>_serving_data.npz`` does not exist yet.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
from pathlib import Path

import numpy as np

from cama.checkpoint import load_checkpoint
from store.artifacts import export_checkpoint
from store.data import save_serving_data
from store.registry import Manifest, ModelRegistry
from training.data import (
    DATASETS,
    VAL_FRACTION,
    ImageDataset,
    add_data_dir_argument,
    images_from_record,
    load_dataset,
    validation_split,
)


def image_serving_data(
    out: Path,
    *,
    dataset: str = "mnist",
    n_canary: int = 1000,
    n_replay: int = 2000,
    seed: int = 0,
    data_dir: str | None = None,
    data: ImageDataset | None = None,
    val_fraction: float = VAL_FRACTION,
    split_seed: int = 0,
) -> Path:
    """Canary: the first ``n_canary`` of the validation split of training (``val_fraction``, seed
    ``split_seed``; never trained on; fewer where the split is smaller); replay: ``n_replay``
    training images (fewer where there are fewer). Stored as uint8 ``(N, C, H, W)``."""
    data = data or load_dataset(dataset, data_dir)
    train, val = validation_split(data.train, val_fraction, seed=split_seed)
    n_replay = min(n_replay, len(train))
    replay_idx = np.sort(np.random.default_rng(seed).choice(len(train), size=n_replay, replace=False))

    def as_uint8(x: np.ndarray) -> np.ndarray:
        return np.round(x * 255.0).astype(np.uint8)

    return save_serving_data(
        out,
        replay=(as_uint8(train.x[replay_idx]), train.y[replay_idx]),
        canary=(as_uint8(val.x[:n_canary]), val.y[:n_canary]),
    )


def measurement_serving_data(out: Path, *, n_canary: int = 1000, n_replay: int = 2000, seed: int = 0) -> Path:
    """From ``training.measurement_data`` (the measurement model's data module), when it exists."""
    try:
        module = importlib.import_module("training.measurement_data")
    except ImportError as exc:
        raise SystemExit(
            "training.measurement_data is missing: cannot build measurement serving data"
        ) from exc
    builder = getattr(module, "serving_data", None)
    if builder is None:
        raise SystemExit("training.measurement_data has no serving_data(n_replay, n_canary, seed) function")
    (ra, rc, rx, ry), (ca, cc, cx, cy) = builder(n_replay=n_replay, n_canary=n_canary, seed=seed)
    return save_serving_data(
        out, replay=(rx, ry), canary=(cx, cy), replay_cond=(ra, rc), canary_cond=(ca, cc)
    )


def export(
    checkpoint: Path,
    name: str,
    store: Path,
    *,
    serving_data: Path | None = None,
    activate: bool = True,
    n_canary: int = 1000,
    n_replay: int = 2000,
    data_dir: str | None = None,
) -> Manifest:
    """Publish ``checkpoint`` as a new version of ``name`` in the store at ``store`` with its serving
    data (default ``<checkpoint dir>/<name>_serving_data.npz``, built when missing from the
    checkpoint's data set: a named one, or the user's images its provenance records)."""
    serving = serving_data or checkpoint.parent / f"{name}_serving_data.npz"
    if not serving.exists():
        _, meta = load_checkpoint(checkpoint)
        source = meta.provenance.get("data_source")
        train_config = meta.provenance.get("train_config", {})
        if isinstance(source, dict):
            image_serving_data(
                serving,
                data=images_from_record(source),
                n_canary=n_canary,
                n_replay=n_replay,
                val_fraction=float(train_config.get("val_fraction", VAL_FRACTION)),
                split_seed=int(train_config.get("seed", 0)),
            )
        elif name in DATASETS:
            image_serving_data(serving, dataset=name, n_canary=n_canary, n_replay=n_replay, data_dir=data_dir)
        else:
            raise SystemExit(f"{serving} does not exist (build it with --make-serving-data)")
    manifest = export_checkpoint(ModelRegistry(store), name, checkpoint, serving, activate=activate)
    if manifest is None:
        raise SystemExit(f"{name}: nothing was published")
    return manifest


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, help="the core checkpoint to publish")
    parser.add_argument("--name", help="model name in the registry (mnist, measurement, ...)")
    parser.add_argument("--store", type=Path, default=Path("model_store"))
    parser.add_argument(
        "--serving-data", type=Path, default=None, help="default <checkpoint dir>/<name>_serving_data.npz"
    )
    parser.add_argument(
        "--no-activate", action="store_true", help="publish without making it the active version"
    )
    parser.add_argument(
        "--make-serving-data", choices=[d for d in DATASETS if d != "images"] + ["measurement"], default=None
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="with --make-serving-data (default models/<name>_serving_data.npz)",
    )
    parser.add_argument("--canary", type=int, default=1000)
    parser.add_argument("--replay", type=int, default=2000)
    add_data_dir_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.make_serving_data:
        out = args.out or Path("models") / f"{args.make_serving_data}_serving_data.npz"
        if args.make_serving_data == "measurement":
            path = measurement_serving_data(out, n_canary=args.canary, n_replay=args.replay)
        else:
            path = image_serving_data(
                out,
                dataset=args.make_serving_data,
                n_canary=args.canary,
                n_replay=args.replay,
                data_dir=args.data_dir,
            )
        print(f"wrote {path} ({path.stat().st_size} bytes)")
        if args.checkpoint is None:
            return
    if args.checkpoint is None or args.name is None:
        parser.error("--checkpoint and --name are required to export")
    manifest = export(
        args.checkpoint,
        args.name,
        args.store,
        serving_data=args.serving_data,
        activate=not args.no_activate,
        n_canary=args.canary,
        n_replay=args.replay,
        data_dir=args.data_dir,
    )
    print(json.dumps({"name": manifest.name, "version": manifest.version, "files": manifest.files}, indent=2))


if __name__ == "__main__":
    main()

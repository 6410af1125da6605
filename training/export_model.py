"""Export a checkpoint into the service's model registry, and build the serving data it ships with.

    python -m training.export_model --checkpoint models/mnist_cama.pt --name mnist --store model_store
    python -m training.export_model --make-serving-data mnist --out models/mnist_serving_data.npz
    python -m training.export_model --make-serving-data cifar_binary   # models/cifar_binary_serving_data.npz

A registry version holds the core checkpoint, its ONNX export (eq. 6 with explicit noise) and
``replay.npz``: labelled clean replay data for eq. 8's clean term and a labelled clean canary
set for the promotion gate. For the image data sets (MNIST, CIFAR-binary) these come from the
training set (replay) and the 5% validation split (canary) of ``training.train_cama``; the
committed ``models/<name>_serving_data.npz`` (uint8) means the service needs no dataset at run time.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
from pathlib import Path

import numpy as np

from store.artifacts import export_checkpoint
from store.data import save_serving_data
from store.registry import ModelRegistry
from training.data import DATASETS, VAL_FRACTION, add_data_dir_argument, load_dataset, validation_split


def image_serving_data(
    out: Path,
    *,
    dataset: str = "mnist",
    n_canary: int = 1000,
    n_replay: int = 2000,
    seed: int = 0,
    data_dir: str | None = None,
) -> Path:
    """Canary: the first ``n_canary`` of the 5% validation split (never trained on; fewer where the
    split is smaller); replay: ``n_replay`` training images. Stored as uint8 ``(N, C, H, W)``."""
    data = load_dataset(dataset, data_dir)
    train, val = validation_split(data.train, VAL_FRACTION, seed=0)
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
    parser.add_argument("--make-serving-data", choices=[*DATASETS, "measurement"], default=None)
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
    serving = args.serving_data or args.checkpoint.parent / f"{args.name}_serving_data.npz"
    if not serving.exists():
        if args.name not in DATASETS:
            parser.error(f"{serving} does not exist (build it with --make-serving-data)")
        image_serving_data(
            serving, dataset=args.name, n_canary=args.canary, n_replay=args.replay, data_dir=args.data_dir
        )
    manifest = export_checkpoint(
        ModelRegistry(args.store), args.name, args.checkpoint, serving, activate=not args.no_activate
    )
    assert manifest is not None
    print(json.dumps({"name": manifest.name, "version": manifest.version, "files": manifest.files}, indent=2))


if __name__ == "__main__":
    main()

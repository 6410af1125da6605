"""Clean accuracy on CIFAR-binary (paper section 4.1): the appendix-C CNN and CAMA on the 2,000
test images, and on the 5% validation split the checkpoints were chosen on.

    python -m experiments.evaluate_cifar --threads 2

CAMA is scored as ``POST /predict`` answers (eq. 6 with K importance samples behind the
first-sample screen, ``training.accuracy.served_accuracy``), at the served K = 10 and at K = 50.
Writes the keys ``cifar.clean.cnn``, ``cifar.clean.cama``, ``cifar.clean.cama_k50`` and their
``cifar.val.*`` twins into ``docs/results/metrics.json``.
"""

from __future__ import annotations

import argparse
import time

import torch

from cama.checkpoint import load_checkpoint
from cama.image_model import ImageCama
from training.accuracy import served_accuracy
from training.baselines import evaluate_accuracy, load_baseline
from training.data import VAL_FRACTION, Split, add_data_dir_argument, load_cifar_binary, validation_split
from training.metrics import update_metrics


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", default="models/cifar_binary_cama.pt")
    parser.add_argument("--cnn", default="models/cifar_cnn.pt")
    add_data_dir_argument(parser)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None, help="score the first N images of each split")
    parser.add_argument("--no-metrics", action="store_true", help="print only; metrics.json untouched")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_cifar_binary(args.data_dir)
    _, val = validation_split(data.train, VAL_FRACTION, seed=0)
    cama, _ = load_checkpoint(args.checkpoint)
    assert isinstance(cama, ImageCama)
    cnn = load_baseline(args.cnn)[0].eval()
    out: dict[str, float] = {}
    for split_name, full in (("clean", data.test), ("val", val)):
        split = Split(full.x[: args.limit], full.y[: args.limit])
        start = time.perf_counter()
        out[f"cifar.{split_name}.cnn"] = evaluate_accuracy(cnn, split.x, split.y)
        out[f"cifar.{split_name}.cama"] = served_accuracy(cama, split.x, split.y, k=10)
        out[f"cifar.{split_name}.cama_k50"] = served_accuracy(cama, split.x, split.y, k=50)
        print(f"{split_name}: {len(split)} images, {time.perf_counter() - start:.0f} s", flush=True)
    for key, value in out.items():
        print(f"{key:28s} {value:.4f}")
    if not args.no_metrics:
        update_metrics(out)


if __name__ == "__main__":
    main()

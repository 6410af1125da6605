"""Train a discriminative baseline (DNN, CNN, BN-CNN on MNIST; the appendix-C CNN on CIFAR-binary).

    python -m training.train_baseline --model dnn --epochs 40 --out models/mnist_dnn.pt
    python -m training.train_baseline --model dnn --augment vshift --aug-range 0.5 \\
        --out models/mnist_dnn_aug_vshift.pt
    python -m training.train_baseline --model bncnn --epochs 6 --out models/mnist_bncnn.pt
    python -m training.train_baseline --model bncnn --out models/mnist_bncnn.pt --eval-only
    python -m training.train_baseline --dataset cifar_binary --epochs 20 --flip --out models/cifar_cnn.pt
    python -m training.train_baseline --data my_images/ --image-size 32 --channels 3 --out models/mine_dnn.pt

Follows ``training.train_cama``: 5% of the training set is held out (seeded) for validation and
the checkpoint with the best clean validation accuracy is kept; Adam with cosine decay per step.
Augmented training (paper fig. 1) concatenates each batch with a manipulated copy of itself;
``--flip`` mirrors a random half of each batch left-right (natural images).
``--dry-run`` runs one batch; ``--resume`` continues from ``<out>.state``. After training the
best checkpoint's clean test accuracy is added to its metrics; for BatchNorm models the TENT
accuracies on the held-out half of the manipulated test set are printed as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from cama.runtime import atomic_write
from training.baselines import BASELINES, build_baseline, evaluate_accuracy, load_baseline, save_baseline
from training.data import (
    ImageDataset,
    Split,
    add_data_args,
    batches,
    data_from_args,
    validation_split,
)
from training.manipulations import named, random_mirror
from training.tent import BATCHNORM_TYPES, tent_accuracy

# The TENT evaluation protocol: manipulated test set, adapt on one half, report the other.
TENT_PROBES: tuple[tuple[str, float], ...] = (("vshift", 0.3), ("noise", 0.3))


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one baseline training run."""

    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    val_fraction: float = 0.05
    augment: str | None = None  # "vshift" / "hshift" / "generic": each batch plus a manipulated copy
    aug_range: float = 0.5
    flip: bool = False  # mirror a random half of each batch left-right
    dry_run: bool = False


def augmented_batch(
    xb: np.ndarray, yb: np.ndarray, cfg: TrainConfig, rng: np.random.Generator
) -> tuple[Tensor, Tensor]:
    """The batch itself, or (with ``cfg.augment``) the batch concatenated with a manipulated copy;
    with ``cfg.flip`` a random half of the images mirrored left-right first."""
    if cfg.flip:
        xb = random_mirror(xb, rng)
    if cfg.augment is None:
        return torch.from_numpy(xb), torch.from_numpy(yb)
    xm = named(cfg.augment, cfg.aug_range)(xb, rng)
    return torch.from_numpy(np.concatenate([xb, xm])), torch.from_numpy(np.concatenate([yb, yb]))


def train(
    model: nn.Module,
    train_split: Split,
    val_split: Split,
    cfg: TrainConfig,
    out: Path,
    *,
    resume: bool = False,
    provenance: dict[str, object] | None = None,
) -> dict[str, float]:
    """Minimise cross-entropy with Adam and per-step cosine decay; keep the best-validation model."""
    torch.manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_split) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    state_path = out.with_suffix(out.suffix + ".state")
    start_epoch, best, epoch_times = 0, -1.0, []
    if resume and state_path.exists():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, best, epoch_times = state["epoch"], state["best"], state["epoch_times"]
        print(f"resumed at epoch {start_epoch} (best val acc {best:.4f})")
    if cfg.dry_run:
        val_split = Split(val_split.x[:64], val_split.y[:64])
    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        rng = np.random.default_rng(cfg.seed + epoch)
        t0 = time.perf_counter()
        total_loss, seen = 0.0, 0
        bar = tqdm(
            batches(train_split, cfg.batch_size, rng),
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            mininterval=10,
        )
        for xb, yb in bar:
            x, y = augmented_batch(xb, yb, cfg, rng)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            opt.step()
            sched.step()
            total_loss += loss.item() * len(yb)
            seen += len(yb)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            if cfg.dry_run:
                break
        epoch_times.append(time.perf_counter() - t0)
        val_acc = evaluate_accuracy(model, val_split.x, val_split.y)
        print(
            f"epoch {epoch + 1}: train {epoch_times[-1]:.1f}s  loss {total_loss / max(1, seen):.4f}  "
            f"val acc {val_acc:.4f}",
            flush=True,
        )
        metrics = {
            "val_accuracy": val_acc,
            "epoch": float(epoch + 1),
            "train_epoch_seconds": float(np.median(epoch_times)),
        }
        if val_acc > best:
            best = val_acc
            save_baseline(
                out, model, provenance={**(provenance or {}), "train_config": asdict(cfg)}, metrics=metrics
            )
        state = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "epoch": epoch + 1,
            "best": best,
            "epoch_times": epoch_times,
        }
        atomic_write(state_path, partial(torch.save, state))  # the resume point
        if cfg.dry_run:
            break
    return {**metrics, "best_val_accuracy": best}


def tent_halves(n: int = 10000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The ("adapt", "eval") halves of the test indices: a seeded permutation, split in two."""
    order = np.random.default_rng(seed).permutation(n)
    return order[: n // 2], order[n // 2 :]


def tent_report(model: nn.Module, test: Split, seed: int = 0) -> dict[str, float]:
    """Source and TENT accuracy on the "eval" half of each manipulated test set in ``TENT_PROBES``.

    The whole test set is manipulated with ``default_rng(seed)``; TENT adapts online over the
    "adapt" half, then goes on over the "eval" half, whose online predictions are scored.
    """
    adapt_idx, eval_idx = tent_halves(len(test), seed)
    report: dict[str, float] = {}
    for name, level in TENT_PROBES:
        xm = named(name, level)(test.x, np.random.default_rng(seed))
        key = f"{name}_{level:g}"
        report[f"source_{key}"] = evaluate_accuracy(model, xm[eval_idx], test.y[eval_idx])
        report[f"tent_{key}"] = tent_accuracy(
            model, xm[eval_idx], test.y[eval_idx], seed=seed, adapt_x=xm[adapt_idx]
        )
    report["source_clean_eval_half"] = evaluate_accuracy(model, test.x[eval_idx], test.y[eval_idx])
    report["tent_clean_eval_half"] = tent_accuracy(
        model, test.x[eval_idx], test.y[eval_idx], seed=seed, adapt_x=test.x[adapt_idx]
    )
    return report


def evaluate_checkpoint(path: Path, data: ImageDataset, *, record: bool) -> dict[str, float]:
    """Clean test accuracy of a saved baseline (kept in its metrics if ``record``); TENT for BN models."""
    model, meta = load_baseline(path)
    result = {"test_accuracy": evaluate_accuracy(model, data.test.x, data.test.y)}
    if record:
        save_baseline(path, model, provenance=meta.provenance, metrics={**meta.metrics, **result})
    if any(isinstance(m, BATCHNORM_TYPES) for m in model.modules()):
        result.update(tent_report(model, data.test))
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of :func:`main`."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_data_args(parser)
    parser.add_argument(
        "--model",
        choices=["dnn", "cnn", "bncnn", "pool_cnn"],
        default=None,
        help="default: dnn on mnist, pool_cnn (the appendix-C CIFAR CNN) on cifar_binary",
    )
    parser.add_argument(
        "--bncnn-head", choices=["gap", "flatten"], default="gap", help="BN-CNN head (global pool or dense)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="checkpoint (default models/mnist_<model>.pt, models/cifar_cnn.pt on cifar_binary)",
    )
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--augment", choices=["vshift", "hshift", "generic"], default=None)
    parser.add_argument("--aug-range", type=float, default=TrainConfig.aug_range)
    parser.add_argument("--flip", action="store_true", help="random left-right mirroring of training images")
    parser.add_argument("--dropout", type=float, default=None, help="pool_cnn: dropout after dense layers")
    parser.add_argument(
        "--networks",
        type=json.loads,
        default=None,
        help="JSON object: fields of the model config to override",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dry-run", action="store_true", help="one batch, one epoch")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--eval-only", action="store_true", help="evaluate --out without training")
    return parser.parse_args(argv)


def baseline_config(
    kind: str, args: argparse.Namespace, data: ImageDataset | None = None
) -> dict[str, object] | None:
    """The config of the ``--model`` kind with the command line's options (``None``: defaults); for
    a user's images (``--data``) its input shape and classes are ``data``'s."""
    config: dict[str, object] = {"kind": kind}
    if kind == "bncnn":
        config["head"] = args.bncnn_head
    if kind == "pool_cnn" and args.dropout is not None:
        config["dropout"] = args.dropout
    if args.data is not None and data is not None:
        channels, height, width = data.train.x.shape[1:]
        shape = {
            "input_dim": channels * height * width,
            "in_channels": channels,
            "image_size": height,
            "num_classes": len(data.classes or ()),
        }
        known = {f.name for f in dataclasses.fields(BASELINES[kind][0])}
        config |= {key: value for key, value in shape.items() if key in known}
    config |= args.networks or {}
    return None if config == {"kind": kind} else config


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_kind = args.model or ("pool_cnn" if args.dataset == "cifar_binary" else "dnn")
    default_out = "models/cifar_cnn.pt" if args.dataset == "cifar_binary" else f"models/mnist_{model_kind}.pt"
    out: Path = args.out or Path(default_out)
    data, data_record = data_from_args(args)
    if args.eval_only:
        print(json.dumps(evaluate_checkpoint(out, data, record=False)))
        return
    tr, val = validation_split(data.train, args.val_fraction, args.seed)
    cfg = TrainConfig(
        val_fraction=args.val_fraction,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        augment=args.augment,
        aug_range=args.aug_range,
        flip=args.flip,
        dry_run=args.dry_run,
    )
    torch.manual_seed(args.seed)
    model = build_baseline(model_kind, baseline_config(model_kind, args, data))
    provenance: dict[str, object] = {**data_record, "train_size": len(tr)}
    result = train(model, tr, val, cfg, out, resume=args.resume, provenance=provenance)
    if args.dry_run:
        result["test_accuracy"] = evaluate_accuracy(model, data.test.x[:256], data.test.y[:256])
    else:
        result.update(evaluate_checkpoint(out, data, record=True))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Train an image CAMA (MNIST or CIFAR-binary): clean data with the intervention ELBO (eq. 3), or
augmented (eq. 5).

    python -m training.train_cama --out models/mnist_cama.pt --epochs 30
    python -m training.train_cama --augment vshift --aug-range 0.5 --out models/mnist_cama_aug_v.pt
    python -m training.train_cama --dataset cifar_binary --augment noise --aug-range 0.1 \
        --out models/cifar_binary_cama.pt
    python -m training.train_cama --dataset cifar_binary --out models/cifar_binary_cama.pt --eval-only
    python -m training.train_cama --data my_images/ --image-size 32 --channels 3 --out models/mine.pt

On CIFAR-binary the model is :meth:`ImageCamaConfig.cifar_binary` (appendix C); the paper trains
it with eq. 5 on copies with Gaussian noise of standard deviation 0.1 (``--augment noise
--aug-range 0.1``).

Follows the paper's protocol: 5% of the training set is held out for validation and the
checkpoint with the best validation accuracy is kept; its clean test accuracy (eq. 6 with
``--test-k`` samples per class) is then added to its metrics. ``--dry-run`` runs one batch; the
run can be resumed from ``<out>.state`` with ``--resume``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cama.adapt import FinetuneConfig
from cama.checkpoint import load_checkpoint, save_checkpoint, sha256_file
from cama.config import KNOWN_TRANSFORMS, ImageCamaConfig
from cama.image_model import ImageCama, with_m_pathway
from cama.objectives import augmented_objective, intervention_elbo
from cama.runtime import atomic_write, resolve_device
from training.accuracy import served_accuracy
from training.data import (
    VAL_FRACTION,
    ImageDataset,
    Split,
    add_data_args,
    batches,
    data_from_args,
    validation_split,
)
from training.manipulations import named, random_mirror


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run."""

    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0  # decoupled (AdamW); 0 is plain Adam
    seed: int = 0
    val_fraction: float = VAL_FRACTION
    val_k: int = 2
    augment: str | None = None  # "vshift" / "hshift" / "noise" / "generic": eq. 5 with manipulated copies
    aug_range: float = 0.5
    lam: float = 0.5
    flip: bool = False  # mirror a random half of each batch left-right before the eq. 5 copies
    bf16: bool = False
    dry_run: bool = False
    time_budget_s: float | None = None  # shorten the run (and its cosine schedule) to fit this budget


def manipulated_split(split: Split, name: str, level: float, seed: int) -> Split:
    """``split`` manipulated once, seeded: the validation set of a model trained with eq. 5."""
    return Split(named(name, level)(split.x, np.random.default_rng(seed)), split.y)


def epochs_within(budget_s: float, first_epoch_s: float, planned: int) -> int:
    """How many epochs fit a wall-clock budget, judged from the first epoch (at least 1)."""
    return max(1, min(planned, int(budget_s // max(first_epoch_s, 1e-9))))


def train(
    model: ImageCama,
    train_split: Split,
    val_split: Split,
    cfg: TrainConfig,
    out: Path,
    *,
    resume: bool = False,
    provenance: dict[str, object] | None = None,
) -> dict[str, float]:
    """Maximise eq. 3 (or eq. 5 with ``cfg.augment``) with Adam and cosine decay; keep the best."""
    torch.manual_seed(cfg.seed)
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_split) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    state_path = out.with_suffix(out.suffix + ".state")
    start_epoch, best, epoch_times, epochs = 0, -1.0, [], cfg.epochs
    if resume and state_path.exists():
        state = torch.load(state_path, weights_only=False, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, best, epoch_times = state["epoch"], state["best"], state["epoch_times"]
        epochs = int(state.get("epochs", cfg.epochs))
        print(f"resumed at epoch {start_epoch} of {epochs} (best val acc {best:.4f})")
    manipulate = named(cfg.augment, cfg.aug_range) if cfg.augment else None
    val_manipulated = (
        manipulated_split(val_split, cfg.augment, cfg.aug_range, cfg.seed + 1) if cfg.augment else None
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
    metrics: dict[str, float] = {}
    epoch = start_epoch
    while epoch < epochs:
        model.train()
        rng = np.random.default_rng(cfg.seed + epoch)
        t0 = time.perf_counter()
        bar = tqdm(
            batches(train_split, cfg.batch_size, rng),
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{epochs}",
            mininterval=10,
        )
        for batch_x, yb in bar:
            xb = random_mirror(batch_x, rng) if cfg.flip else batch_x
            x, y = torch.from_numpy(xb).to(device), torch.from_numpy(yb).to(device)
            xm = None if manipulate is None else torch.from_numpy(manipulate(xb, rng)).to(device)
            with autocast:
                if xm is None:
                    objective = intervention_elbo(model, x, y).mean()
                else:
                    objective = augmented_objective(model, (x, y), (xm, y), cfg.lam)
            loss = -objective
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
            bar.set_postfix(elbo=f"{objective.item():.1f}", refresh=False)
            if cfg.dry_run:
                break
        epoch_times.append(time.perf_counter() - t0)
        if cfg.time_budget_s is not None and epoch == 0 and not cfg.dry_run:
            epochs = epochs_within(cfg.time_budget_s, epoch_times[0] * 1.15, cfg.epochs)  # 15%: validation
            sched.T_max = epochs * steps_per_epoch  # the cosine decay now ends with the shortened run
            print(f"time budget {cfg.time_budget_s:.0f}s: {epochs} epochs", flush=True)
        limit = 64 if cfg.dry_run else None
        val_acc = served_accuracy(model, val_split.x[:limit], val_split.y[:limit], k=cfg.val_k)
        metrics = {
            "val_accuracy": val_acc,
            "epoch": float(epoch + 1),
            "epochs": float(epochs),
            "train_epoch_seconds": float(np.median(epoch_times)),
        }
        # a model trained with eq. 5 is selected on the mean of its clean and manipulated accuracy
        score = val_acc
        if val_manipulated is not None:
            manip_x, manip_y = val_manipulated.x[:limit], val_manipulated.y[:limit]
            metrics["val_accuracy_manipulated"] = served_accuracy(model, manip_x, manip_y, k=cfg.val_k)
            score = (val_acc + metrics["val_accuracy_manipulated"]) / 2
        print(
            f"epoch {epoch + 1}: train {epoch_times[-1]:.1f}s  val acc (K={cfg.val_k}) {val_acc:.4f}"
            + (f", manipulated {metrics['val_accuracy_manipulated']:.4f}" if val_manipulated else ""),
            flush=True,
        )
        if score > best:
            best = score
            save_checkpoint(
                out, model, provenance={**(provenance or {}), "train_config": cfg.__dict__}, metrics=metrics
            )
        state = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "epoch": epoch + 1,
            "epochs": epochs,
            "best": best,
            "epoch_times": epoch_times,
        }
        atomic_write(state_path, partial(torch.save, state))  # the resume point
        if cfg.dry_run:
            break
        epoch += 1
    return {**metrics, "best_val_accuracy": best}


def convert(source: Path, pathway: str, out: Path, networks: dict[str, object] | None = None) -> None:
    """Write ``source`` with another m pathway (mechanisms start at the identity) and the config
    fields ``networks`` (which must keep every weight's shape) to ``out``."""
    clean, meta = load_checkpoint(source)
    if not isinstance(clean, ImageCama):
        raise SystemExit(f"{source} is not an image CAMA checkpoint")
    overrides: dict[str, object] = {"q_m_logvar_init": clean.config.q_m_logvar_init}
    if pathway != clean.config.m_pathway:
        overrides["q_m_logvar_init"] = ImageCamaConfig.q_m_logvar_init
    try:
        model = with_m_pathway(clean, pathway, **overrides, **(networks or {}))
    except (TypeError, ValueError, RuntimeError) as exc:  # unknown field, bad value, other shape
        raise SystemExit(f"--networks {networks}: {exc}") from exc
    provenance = {
        **meta.provenance,
        "converted_from": str(source),
        "source_sha256": sha256_file(source),
        "adapt_recipe": FinetuneConfig().as_dict(),  # the image recipe, which /adapt runs for it
    }
    digest = save_checkpoint(out, model, provenance=provenance, metrics=meta.metrics)
    print(f"{out}: m_pathway={pathway} sha256={digest}")


def warm_start(source: Path, pathway: str | None, transforms: tuple[str, ...] | None = None) -> ImageCama:
    """The image CAMA stored in ``source``, to continue training from (its m pathway and
    mechanisms unless given; new mechanisms start at the identity)."""
    model, _ = load_checkpoint(source)
    if not isinstance(model, ImageCama):
        raise SystemExit(f"--init-from {source}: not an image CAMA checkpoint")
    pathway = pathway or model.config.m_pathway
    overrides: dict[str, object] = {} if transforms is None else {"transforms": tuple(transforms)}
    if pathway != model.config.m_pathway or overrides.get("transforms", model.config.transforms) != (
        model.config.transforms
    ):
        model = with_m_pathway(model, pathway, q_m_logvar_init=ImageCamaConfig.q_m_logvar_init, **overrides)
    return model


def model_config(
    dataset: str, tiny: bool, data: ImageDataset | None = None, networks: dict[str, object] | None = None
) -> ImageCamaConfig:
    """The appendix-C model of ``dataset`` (MNIST's or :meth:`ImageCamaConfig.cifar_binary`; for a
    user's ``images``, MNIST's networks on ``data``'s image shape and classes), or a tiny one of the
    same image shape and classes; ``networks`` overrides any of its fields (widths, dimensions)."""
    if dataset == "cifar_binary":
        full = ImageCamaConfig.cifar_binary()
    elif dataset == "images" and data is not None:
        channels, height, width = data.train.x.shape[1:]
        full = ImageCamaConfig(
            num_classes=len(data.classes or ()), image_size=(height, width), channels=channels
        )
    else:
        full = ImageCamaConfig()
    shape = {"num_classes": full.num_classes, "image_size": full.image_size, "channels": full.channels}
    base = ImageCamaConfig.tiny(**shape) if tiny else full
    return replace(base, **(networks or {}))  # type: ignore[arg-type]


def evaluate_checkpoint(path: Path, data: ImageDataset, k: int, *, record: bool) -> dict[str, float]:
    """Clean test accuracy of a saved image CAMA as ``/predict`` answers (eq. 6, ``k`` samples per
    class, float32, :func:`training.accuracy.served_accuracy`), kept in its metrics if ``record``."""
    model, meta = load_checkpoint(path)
    if not isinstance(model, ImageCama):
        raise SystemExit(f"{path} is not an image CAMA checkpoint")
    result = {"test_accuracy": served_accuracy(model, data.test.x, data.test.y, k=k), "test_k": float(k)}
    if record:
        save_checkpoint(path, model, provenance=meta.provenance, metrics={**meta.metrics, **result})
    return result


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_data_args(parser)
    parser.add_argument("--out", type=Path, default=Path("models/mnist_cama.pt"))
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument(
        "--weight-decay", type=float, default=TrainConfig.weight_decay, help="decoupled weight decay (AdamW)"
    )
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--val-k", type=int, default=TrainConfig.val_k)
    parser.add_argument("--test-k", type=int, default=10, help="eq. 6 samples per class for test accuracy")
    parser.add_argument("--eval-only", action="store_true", help="test accuracy of --out, no training")
    parser.add_argument(
        "--augment",
        choices=["vshift", "hshift", "noise", "generic"],
        default=None,
        help="eq. 5 with manipulated copies: a shift of --aug-range, Gaussian noise of standard "
        "deviation --aug-range, or the generic family",
    )
    parser.add_argument(
        "--transforms",
        nargs="+",
        choices=KNOWN_TRANSFORMS,
        default=None,
        help="mechanisms of the transform m pathway (default: the config's)",
    )
    parser.add_argument("--aug-range", type=float, default=TrainConfig.aug_range)
    parser.add_argument("--lam", type=float, default=TrainConfig.lam)
    parser.add_argument("--flip", action="store_true", help="random left-right mirroring of training images")
    parser.add_argument(
        "--bf16", action="store_true", help="bfloat16 autocast (faster on AVX512-BF16/AMX CPUs)"
    )
    parser.add_argument("--tiny", action="store_true", help="a tiny model (smoke tests)")
    parser.add_argument(
        "--networks",
        type=json.loads,
        default=None,
        help="JSON object: fields of the model config to override",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dry-run", action="store_true", help="one batch, one epoch")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="warm start: begin from this checkpoint's weights (new optimiser and lr schedule)",
    )
    parser.add_argument(
        "--convert",
        type=Path,
        default=None,
        help="no training: write this clean checkpoint with --m-pathway to --out (the served model)",
    )
    parser.add_argument(
        "--m-pathway",
        choices=["additive", "transform"],
        default=None,
        help="m pathway of the trained model (default additive) or of --convert's output (default transform)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument(
        "--time-budget", type=float, default=None, help="seconds: fit the run (and its lr schedule) to it"
    )
    args = parser.parse_args(argv)
    if args.convert is not None:
        convert(args.convert, args.m_pathway or "transform", args.out, args.networks)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    data, data_record = data_from_args(args)
    if args.eval_only:
        print(json.dumps(evaluate_checkpoint(args.out, data, args.test_k, record=False)))
        return
    tr, val = validation_split(data.train, args.val_fraction, args.seed)
    cfg = TrainConfig(
        val_fraction=args.val_fraction,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        val_k=args.val_k,
        augment=args.augment,
        aug_range=args.aug_range,
        lam=args.lam,
        flip=args.flip,
        bf16=args.bf16,
        dry_run=args.dry_run,
        time_budget_s=args.time_budget,
    )
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    provenance: dict[str, object] = {
        "adapt_recipe": FinetuneConfig().as_dict(),  # the image recipe, which /adapt runs for it
        **data_record,
        "train_size": len(tr),
        "device": device.type,
    }
    if args.init_from is not None:
        model = warm_start(args.init_from, args.m_pathway, args.transforms).to(device)
        provenance |= {"init_from": str(args.init_from), "init_sha256": sha256_file(args.init_from)}
    else:
        dataset = "images" if args.data is not None else args.dataset
        base = model_config(dataset, args.tiny, data, args.networks)
        if args.transforms is not None:
            base = replace(base, transforms=tuple(args.transforms))
        model = ImageCama(replace(base, m_pathway=args.m_pathway or "additive")).to(device)
    result = train(
        model,
        tr,
        val,
        cfg,
        args.out,
        resume=args.resume,
        provenance=provenance,
    )
    if not args.dry_run:
        result.update(evaluate_checkpoint(args.out, data, args.test_k, record=True))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

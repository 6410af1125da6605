"""Cross-shift spread of fig. 7 on one device: fine-tune on horizontal shift, score vertical shift.

    python scripts/cross_shift_spread.py --seeds 0 1 2 3       # the recipe: cosine over the last fifth
    python scripts/cross_shift_spread.py --schedule constant --seeds 0 1 2 3   # the step before it
    python scripts/cross_shift_spread.py --decay 1 --seeds 0 1 2 3             # cosine over the whole run
    python scripts/cross_shift_spread.py --average tail --seeds 0 1 2 3    # mean of the last half's iterates
    python scripts/cross_shift_spread.py --snapshots 0.5 0.6 0.7 0.8 0.9 1 --seeds 0 --score-limit 2000 \
        --out docs/results/cross_shift_trajectory.json     # also score the iterates along the run
    python scripts/cross_shift_spread.py --table                    # print what is in --out
    python scripts/cross_shift_spread.py --device cuda --out /tmp/gpu.json --seeds 0 1 2

Issue 2 asks that fine-tuning on one shift lower accuracy on the other by at most 1 point. With
the constant step, the evaluation's one run (seed 0, on a GPU) missed it at range 0.2, horizontal
-> vertical, and 11 GPU seeds (``training.ft_seed_spread``) spread from -2.3 to +1.1 points. This
script repeats that one direction with ``EvalConfig.ft`` and other seeds on this machine (or with
another schedule, or with tail averaging of the iterates), scoring the whole vertical-shift
scoring half (K=10, importance-sampling seed 0) and, as a check that the fine-tuning adapted, the
first 1000 images of the horizontal one. Results go to ``--out`` (one entry per recipe and seed,
plus the model without fine-tuning), with the device and the checkpoint digest; an entry already
there is not measured again.
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cama.checkpoint import load_checkpoint, sha256_file
from cama.image_model import ImageCama
from cama.runtime import resolve_device
from training.data import Split, load_mnist
from training.evaluate_mnist import EvalConfig
from training.experiment import (
    cama_accuracy,
    finetuned,
    manipulated_halves,
    replay_set,
    variant,
)


def table(results: dict[str, dict[str, Any]]) -> list[str]:
    """One row per recipe: the seeds' accuracies and their spread against no fine-tuning."""
    base = results.get("none", {}).get("acc_v")
    lines = [
        "| recipe | seeds | vshift accuracy per seed | mean - no FT (points) | std | worst | below -1 |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    if base is None:
        return lines
    for recipe in sorted({recipe_name(e) for e in results.values() if "schedule" in e}):
        rows = sorted(
            (e for e in results.values() if "schedule" in e and recipe_name(e) == recipe),
            key=lambda e: e["seed"],
        )
        lines.append(_row(recipe, [e["seed"] for e in rows], [e["acc_v"] for e in rows], base))
        # the last iterate of averaged runs (--snapshots 1): the same runs without the averaging
        last = [e for e in rows if e.get("average", "none") != "none" and "1" in e.get("iterates_acc_v", {})]
        if last:
            accs = [e["iterates_acc_v"]["1"] for e in last]
            lines.append(_row(f"{recipe}, its last iterate", [e["seed"] for e in last], accs, base))
    return lines


def _row(recipe: str, seeds: list[int], accs_list: list[float], base: float) -> str:
    accs = np.array(accs_list)
    diffs = 100 * (accs - base)
    std = diffs.std(ddof=1) if len(diffs) > 1 else 0.0
    return (
        f"| {recipe} | {', '.join(str(s) for s in seeds)} | "
        f"{', '.join(f'{a:.4f}' for a in accs)} | {diffs.mean():+.2f} | {std:.2f} "
        f"| {diffs.min():+.2f} | {int((diffs < -1).sum())} of {len(seeds)} |"
    )


def recipe_name(entry: dict[str, Any]) -> str:
    """``constant``, ``cosine`` (``cosine@0.2``: decayed over the last fifth of the run only), or
    either with ``+tail`` where the iterates were averaged."""
    average = entry.get("average", "none")
    decay = entry.get("decay_fraction", 1.0)
    name = str(entry["schedule"]) + ("" if decay == 1.0 or entry["schedule"] != "cosine" else f"@{decay:g}")
    return name + ("" if average == "none" else f"+{average}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--checkpoint", default="models/mnist_cama_clean.pt")
    parser.add_argument("--range", type=float, default=0.2, dest="level")
    parser.add_argument("--seeds", nargs="*", type=int, default=[])
    recipe = EvalConfig().ft
    parser.add_argument("--schedule", choices=["constant", "cosine"], default=recipe.lr_schedule)
    parser.add_argument(
        "--decay",
        type=float,
        default=recipe.decay_fraction,
        help="with --schedule cosine: FinetuneConfig.decay_fraction",
    )
    parser.add_argument("--average", choices=["none", "tail"], default="none", help="FinetuneConfig.average")
    parser.add_argument(
        "--snapshots",
        nargs="*",
        type=float,
        default=[],
        metavar="FRACTION",
        help="also score the iterate after these fractions of the run (1: the last) on both shifts",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--ft-steps", type=int, default=None, help="cap fine-tuning steps (smoke runs)")
    parser.add_argument("--score-limit", type=int, default=None, help="score the first N images (smoke runs)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/cross_shift_cpu.json"))
    parser.add_argument("--table", action="store_true", help="only print the table of --out")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, dict[str, Any]] = json.loads(args.out.read_text()) if args.out.exists() else {}
    if not args.table:
        measure(args, results)
    print("\n".join(table(results)))


def measure(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> None:
    clean, _ = load_checkpoint(args.checkpoint)
    if not isinstance(clean, ImageCama):
        raise SystemExit(f"{args.checkpoint} is not an image CAMA checkpoint")
    digest = sha256_file(args.checkpoint)[:12]
    device = resolve_device(args.device)
    clean = clean.to(device)
    cfg = EvalConfig()
    mnist = load_mnist(args.data_dir)
    replay = replay_set(mnist, cfg.replay)
    n = args.score_limit
    v_all = manipulated_halves(mnist.test, "vshift", args.level).score
    vshift = Split(v_all.x[:n], v_all.y[:n])
    hshift = manipulated_halves(mnist.test, "hshift", args.level)
    n_h = min(n or 1000, 1000)
    h_check = Split(hshift.score.x[:n_h], hshift.score.y[:n_h])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    info = {
        "model": digest,
        "range": args.level,
        "device": f"{device.type} ({where})",
        "n_scored": len(vshift.y),
    }

    def save(key: str, entry: dict[str, Any]) -> None:
        results[key] = {**entry, **info}
        print(key, json.dumps(results[key]), flush=True)
        args.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")

    if any(results.get("none", {}).get(k) != info[k] for k in ("model", "n_scored")):
        save("none", {"acc_v": cama_accuracy(variant(clean, "transform"), vshift, cfg.k)})
    for seed in args.seeds:
        recipe = recipe_name(
            {"schedule": args.schedule, "average": args.average, "decay_fraction": args.decay}
        )
        key = f"{recipe}.{seed}"
        if all(results.get(key, {}).get(k) == info[k] for k in ("model", "n_scored")):
            continue
        ft = replace(
            cfg.ft,
            seed=seed,
            lr_schedule=args.schedule,
            decay_fraction=args.decay,
            average=args.average,
            max_steps=args.ft_steps,
        )
        iterates: dict[float, list[torch.Tensor]] = {}

        def keep(
            model: ImageCama, fraction: float, iterates: dict[float, list[torch.Tensor]] = iterates
        ) -> None:
            for f in args.snapshots:
                if f not in iterates and fraction >= f - 1e-9:
                    iterates[f] = [p.detach().clone() for p in model.m_parameters()]

        model, seconds = finetuned(
            clean, "transform", replay, hshift.adapt.x[cfg.gate_holdout :], ft, log_every=0, on_step=keep
        )
        entry = {
            "schedule": args.schedule,
            "average": args.average,
            "decay_fraction": args.decay,
            "seed": seed,
            "ft_seconds": round(seconds, 1),
            "acc_v": cama_accuracy(model, vshift, cfg.k),
            "acc_h_first1000": cama_accuracy(model, h_check, cfg.k),
        }
        if iterates:
            entry["iterates_acc_v"] = score_iterates(model, iterates, vshift, cfg.k)
            entry["iterates_acc_h_first1000"] = score_iterates(model, iterates, h_check, cfg.k)
        save(key, entry)


def score_iterates(
    model: ImageCama, iterates: dict[float, list[torch.Tensor]], split: Split, k: int
) -> dict[str, float]:
    """Accuracy on ``split`` of each kept iterate (the model's NN_M^p/NN_M^q set to it)."""
    params = model.m_parameters()
    scores = {}
    with torch.no_grad():
        for fraction, weights in sorted(iterates.items()):
            for p, w in zip(params, weights, strict=True):
                p.copy_(w)
            scores[f"{fraction:g}"] = cama_accuracy(model, split, k)
    return scores


if __name__ == "__main__":
    main()

"""How much fig. 7's fine-tuning figures move with the fine-tuning seed alone.

    python -m experiments.ft_seed_spread --device cuda --ranges 0.2 0.3 --seeds 1 2
    python -m experiments.ft_seed_spread --merge a.json b.json     # join parallel runs, print the table
    python -m experiments.ft_seed_spread --ft-schedule constant --out constant.json   # another recipe

``evaluate_mnist`` fine-tunes once per (shift, range) with seed 0. This command repeats exactly
that fine-tuning (the transform m pathway, eq. 8 on the unlabelled adapt half minus the gate's
hold-out, the same ``EvalConfig.ft``) with other seeds (the replay sample, the batch order and the
ELBO's noise change; the data, its split and the initial q(m|x) projection, which
``ImageCama.reinit_m_inference`` always draws with seed 0, do not) and scores both shifts' scoring
halves, so that a figure such as "fine-tuning on one shift lowers the other by at most 1 point"
can be read against its seed-to-seed spread. Figures are cached in
``docs/results/mnist_ft_seeds.json`` with the digest of the checkpoint they scored and the
fine-tuning recipe (``--ft-*`` as in ``evaluate_mnist``); the table shows only the figures of
the recipe asked for, seed 0 included.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cama.checkpoint import load_checkpoint, sha256_file
from cama.image_model import ImageCama
from cama.runtime import atomic_write, resolve_device
from experiments.eval_cache import Cache, entry_recipe, recipe_id
from experiments.experiment import (
    add_recipe_args,
    finetuned,
    manipulated_halves,
    recipe_from_args,
    replay_set,
    table_accuracy,
)
from experiments.mnist_sections import RANGES, SHIFTS, EvalConfig
from training.data import add_data_dir_argument, load_mnist

OUT = Path("docs/results/mnist_ft_seeds.json")


def key(ft_shift: str, scored: str, r: float, seed: int) -> str:
    return f"mnist.ft_seed.{seed}.{scored}.{r}.cama_ft_{SHIFTS[ft_shift]}"


def measure(args: argparse.Namespace, cache: Cache, digest: str) -> None:
    """Fine-tune on each shift and range with each seed; score both shifts."""
    device = resolve_device(args.device)
    clean, _ = load_checkpoint(args.checkpoint)
    if not isinstance(clean, ImageCama):
        raise SystemExit(f"{args.checkpoint} is not an image CAMA checkpoint")
    clean = clean.to(device)
    ft = recipe_from_args(args, EvalConfig().ft)
    cfg = EvalConfig(k=args.k, score_limit=args.score_limit, ft=ft)
    recipe = recipe_id(ft)
    mnist = load_mnist(args.data_dir)
    replay = replay_set(mnist, cfg.replay)
    for r in args.ranges:
        sets = {shift: manipulated_halves(mnist.test, shift, r) for shift in SHIFTS}
        for seed in args.seeds:
            for ft_shift, halves in sets.items():
                keys = [key(ft_shift, scored, r, seed) for scored in SHIFTS]
                if all(cache.fresh(k, digest, recipe) for k in keys):
                    continue
                model, seconds = finetuned(
                    clean, "transform", replay, halves.adapt.x[cfg.gate_holdout :], replace(ft, seed=seed)
                )
                print(f"  ft on {ft_shift} {r} seed {seed}: {seconds:.0f}s", flush=True)
                for scored, k in zip(SHIFTS, keys, strict=True):
                    score = partial(table_accuracy, model, sets[scored].score, cfg.k, limit=cfg.score_limit)
                    cache.get(k, score, model=digest, recipe=recipe, seed=seed, ft_seconds=round(seconds, 1))


def table(cache: Cache, evaluated: dict[str, dict[str, Any]], digest: str, recipe: str) -> list[str]:
    """Per range and direction: the clean model, seed 0 (evaluate_mnist) and the other seeds,
    fine-tuned with ``recipe`` (:func:`recipe_id`)."""

    def value(k: str, data: dict[str, dict[str, Any]]) -> float | None:
        entry = data.get(k)
        if entry is None or entry.get("model") != digest or entry_recipe(k, entry) not in (None, recipe):
            return None
        return float(entry["value"])

    lines = [
        "| fine-tuned on | scored on | range | no FT | seed 0 | other seeds | mean - no FT (points) |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: |",
    ]
    seeds = sorted({int(k.split(".")[2]) for k in cache.data})
    for r in RANGES:
        for ft_shift in SHIFTS:
            for scored in SHIFTS:
                base = value(f"mnist.{scored}.{r}.cama", evaluated)
                first = value(f"mnist.{scored}.{r}.cama_ft_{SHIFTS[ft_shift]}", evaluated)
                others = [
                    v for s in seeds if (v := value(key(ft_shift, scored, r, s), cache.data)) is not None
                ]
                if not others or base is None or first is None:
                    continue
                mean = float(np.mean([first, *others]))
                lines.append(
                    f"| {ft_shift} | {scored} | {r} | {base:.4f} | {first:.4f} | "
                    f"{', '.join(f'{v:.4f}' for v in others)} | {100 * (mean - base):+.2f} |"
                )
    return lines


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_data_dir_argument(parser)
    parser.add_argument("--checkpoint", default="models/mnist_cama_clean.pt")
    parser.add_argument("--ranges", nargs="*", type=float, default=[0.1, 0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--seeds", nargs="*", type=int, default=[1, 2])
    parser.add_argument("--k", type=int, default=EvalConfig.k)
    parser.add_argument("--score-limit", type=int, default=None)
    add_recipe_args(parser)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--table", type=Path, default=None, help="markdown table (default: --out with .md)")
    parser.add_argument("--evaluated", type=Path, default=Path("docs/results/mnist_eval.json"))
    parser.add_argument(
        "--merge", nargs="+", default=[], metavar="CACHE", help="take other runs' figures first"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    digest = sha256_file(args.checkpoint)[:12]
    cache = Cache(args.out, force=False)
    cache.context = {"device": args.device}
    for path in args.merge:
        cache.merge(json.loads(Path(path).read_text()), digest)
    cache.forget_other(digest, keep=lambda _: False)
    cache.save()
    if args.ranges and args.seeds:
        measure(args, cache, digest)
    evaluated = json.loads(args.evaluated.read_text()) if args.evaluated.exists() else {}
    recipe = recipe_id(recipe_from_args(args, EvalConfig().ft))
    lines = table(cache, evaluated, digest, recipe)
    print("\n".join(lines))
    intro = [
        "# Fine-tuning seed spread (fig. 7)",
        "",
        f"Checkpoint `{args.checkpoint}` (sha256 `{digest}...`). Accuracy on the scoring half after",
        "fine-tuning the transform m pathway on one shift's unlabelled adapt half; seed 0 is the figure",
        "of `evaluate_mnist` (`mnist_eval.json`), the other seeds repeat that fine-tuning with another",
        "seed (`mnist_ft_seeds.json`). Last column: mean over all seeds minus the model without",
        "fine-tuning, in points. Written by `python -m experiments.ft_seed_spread` (see its docstring).",
        f"Adaptation recipe: `{recipe}`.",
        "",
    ]
    atomic_write(args.table or args.out.with_suffix(".md"), "\n".join([*intro, *lines]) + "\n")


if __name__ == "__main__":
    main()

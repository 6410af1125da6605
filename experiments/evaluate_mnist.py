"""Reproduce the paper's MNIST figures as numbers, plots and JSON (figs. 1, 7, 8, 9, 10 + noise).

    python -m experiments.evaluate_mnist                       # everything, resuming from the cache
    python -m experiments.evaluate_mnist --sections clean fig7 --ranges 0.3 0.5
    python -m experiments.evaluate_mnist --merge run1/mnist_eval.json run2/mnist_eval.json --sections

Protocol (appendix C): fine-tuning uses the unlabelled "adapt" half of the manipulated test set
(minus ``--gate-holdout`` images kept for the promotion gate's held-out ELBO(x)); accuracy is
reported on the other half (``experiments.mnist_sections``). Every measured figure is cached in
``docs/results/mnist_eval.json`` (``experiments.eval_cache``: an interrupted run resumes; a fine-tuned
figure records its recipe and is measured again under another one), then written as flat keys
into ``docs/results/metrics.json``, as tables in ``docs/results/mnist.md`` and as plots beside them
(``experiments.mnist_report``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from experiments.experiment import add_recipe_args, recipe_from_args
from experiments.mnist_report import write_outputs
from experiments.mnist_sections import (
    RANGES,
    SECTIONS,
    VARIANTS,
    EvalConfig,
    Evaluator,
    section_ablation,
    section_clean,
    section_fig1,
    section_fig7,
    section_fig8,
    section_fig9,
    section_fig10,
    section_noise,
    section_tent_lr,
    section_unseen,
)
from training.data import add_data_dir_argument

RESULTS = Path("docs/results")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_data_dir_argument(parser)
    parser.add_argument("--checkpoint", default="models/mnist_cama_clean.pt")
    parser.add_argument("--dnn", default="models/mnist_dnn.pt")
    parser.add_argument("--dnn-aug-v", dest="dnn_aug_v", default="models/mnist_dnn_aug_vshift.pt")
    parser.add_argument("--dnn-aug-h", dest="dnn_aug_h", default="models/mnist_dnn_aug_hshift.pt")
    parser.add_argument(
        "--bncnn", default="models/mnist_bncnn_flat.pt", help="TENT: BN-CNN with a dense head"
    )
    parser.add_argument(
        "--bncnn-gap", dest="bncnn_gap", default="models/mnist_bncnn.pt", help="TENT: BN-CNN, global pooling"
    )
    parser.add_argument("--cama-aug-v", dest="cama_aug_v", default="models/mnist_cama_aug_vshift.pt")
    parser.add_argument("--cama-aug-h", dest="cama_aug_h", default="models/mnist_cama_aug_hshift.pt")
    parser.add_argument(
        "--sections",
        nargs="*",
        choices=SECTIONS,
        default=list(SECTIONS),
        help="what to measure (none: only rewrite the tables, plots and metrics from the cache)",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        default=[],
        metavar="CACHE",
        help="first take the figures of other runs' mnist_eval.json (parallel processes, another machine)",
    )
    parser.add_argument("--ranges", nargs="+", type=float, default=list(RANGES))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--k", type=int, default=EvalConfig.k)
    parser.add_argument("--score-limit", type=int, default=None, help="score on the first N of each half")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--out-dir", default=str(RESULTS), help="where metrics, tables and plots go")
    parser.add_argument("--ft-cache", default="models/scratch", help="where fine-tuned weights are kept")
    add_recipe_args(parser)
    parser.add_argument(
        "--clean-limit", type=int, default=None, help="clean accuracy on the first N test images"
    )
    parser.add_argument("--canary", type=int, default=1000, help="labelled clean images for the gate")
    parser.add_argument("--gate-holdout", type=int, default=500, help="adapt images kept for the gate")
    parser.add_argument("--force", action="store_true", help="ignore the cache and cached fine-tuned models")
    parser.add_argument(
        "--again-ft",
        dest="again_ft",
        action="store_true",
        help="measure the fine-tuned figures of this checkpoint again and keep the others (fine-tuned"
        " weights in --ft-cache are still reused: give a fresh one)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ft = recipe_from_args(args, EvalConfig().ft)
    cfg = EvalConfig(
        k=args.k, score_limit=args.score_limit, ft=ft, gate_holdout=args.gate_holdout, canary=args.canary
    )
    ev = Evaluator(args, cfg)
    sections: dict[str, Callable[[Evaluator], None]] = {
        "clean": section_clean,
        "fig1": section_fig1,
        "fig7": section_fig7,
        "noise": section_noise,
        "unseen": section_unseen,
        "fig8": section_fig8,
        "fig9": section_fig9,
        "fig10": section_fig10,
        "ablation": section_ablation,
        "tent_lr": section_tent_lr,
    }
    for name in args.sections:
        if name in sections:
            sections[name](ev)
    write_outputs(ev)


if __name__ == "__main__":
    main()

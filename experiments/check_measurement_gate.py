"""What the service's promotion gate decides when a synthetic measurement checkpoint adapts to a child shift.

    python -m experiments.check_measurement_gate            # models/measurement_cama.pt, S = 0.5, 1, 2, 3
    python -m experiments.check_measurement_gate --checkpoint models/x.pt --shifts 1 2

For each shift S the checkpoint's own generator seed regenerates the 500 test rows, shifts the
children by S (``X -> X + S sd(X)``) and treats them as one unlabelled ``/adapt`` batch, exactly
as the service does (``store.adaptation``): 20% held out for the gate, the rest fine-tuned on with
the clean replay rows (eq. 8), the gate (``cama.adapt.adapt_and_judge``, the service's default
thresholds) judged on the checkpoint's labelled clean canary. Two recipes are compared: the one
shipped with the checkpoint (``adapt_recipe``) and the same with the paper's alpha = 0.5. Accuracy on the
whole shifted batch (labels are known here, not to the service) is printed beside the decision.
Writes ``docs/results/measurement_gate.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cama.adapt import (
    HOLDOUT_FRACTION,
    MEASUREMENT_RECIPE,
    FinetuneConfig,
    GateConfig,
    Labelled,
    adapt_and_judge,
    holdout_split,
)
from cama.checkpoint import load_checkpoint
from cama.measurement_model import MeasurementCama
from cama.runtime import atomic_write
from training.measurement_data import make_dataset, to_frame
from training.measurement_training import accuracy, as_tensors, load_encoding, replay_path

PAPER_ALPHA = 0.5  # eq. 8's weight of the clean term in the paper's MNIST experiments


def take(x: torch.Tensor, cond: tuple[torch.Tensor, torch.Tensor], idx: np.ndarray) -> tuple[Any, Any]:
    """Rows ``idx`` of an encoded batch."""
    index = torch.from_numpy(idx)
    return x[index], (cond[0][index], cond[1][index])


def check(checkpoint: Path, shifts: list[float], recipes: dict[str, FinetuneConfig]) -> list[dict[str, Any]]:
    """One row per (shift, recipe): accuracies, the canary before and after, the gate's decision."""
    model, meta = load_checkpoint(checkpoint)
    if not isinstance(model, MeasurementCama) or "generator_seed" not in meta.provenance:
        raise SystemExit(f"{checkpoint}: not a synthetic measurement checkpoint (no generator_seed)")
    encoding = load_encoding(meta.provenance)
    data = make_dataset(int(meta.provenance["generator_seed"]))
    saved = {k: torch.from_numpy(v) for k, v in np.load(replay_path(checkpoint)).items()}
    canary = Labelled(saved["canary_x"], saved["canary_y"], (saved["canary_a"], saved["canary_c"]))
    replay = Labelled(saved["replay_x"], saved["replay_y"], (saved["replay_a"], saved["replay_c"]))
    gate_cfg = GateConfig()
    rows = []
    for s in shifts:
        shifted = encoding.encode(to_frame(data.equations.shift_children(data.test, s)))
        x, cond = as_tensors(shifted)
        for name, recipe in recipes.items():
            held_idx, fit_idx = holdout_split(len(shifted), HOLDOUT_FRACTION, recipe.seed)
            held_x, held_cond = take(x, cond, held_idx)
            fit_x, fit_cond = take(x, cond, fit_idx)
            adapted = copy.deepcopy(model)
            decision = adapt_and_judge(
                adapted,
                fit_x,
                held_x,
                recipe,
                gate_cfg,
                replay=replay,
                canary=canary,
                train_cond=fit_cond,
                heldout_cond=held_cond,
                keep_refused=True,  # scored either way; the service would keep the old model
            ).decision
            rows.append(
                {
                    "shift": s,
                    "recipe": name,
                    "finetune": recipe.as_dict(),
                    "shifted_accuracy_before": accuracy(model, shifted, k=gate_cfg.k),
                    "shifted_accuracy_after": accuracy(adapted, shifted, k=gate_cfg.k),
                    "canary_before": decision.before.clean_accuracy,
                    "canary_after": decision.after.clean_accuracy,
                    "accepted": decision.accepted,
                    "reasons": list(decision.reasons),
                }
            )
            r = rows[-1]
            before, after = r["shifted_accuracy_before"], r["shifted_accuracy_after"]
            print(
                f"S={s:<4} {name:<8} shifted {before:.3f} -> {after:.3f}"
                f"  canary {r['canary_before']:.3f} -> {r['canary_after']:.3f}"
                f"  {'accepted' if r['accepted'] else 'REFUSED'}",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=Path("models/measurement_cama.pt"))
    parser.add_argument("--shifts", type=float, nargs="+", default=[0.5, 1.0, 2.0, 3.0])
    parser.add_argument("--out", type=Path, default=Path("docs/results/measurement_gate.json"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    _, meta = load_checkpoint(args.checkpoint)
    shipped = meta.provenance.get("adapt_recipe")
    shipped_recipe = FinetuneConfig.from_dict(shipped) if shipped else MEASUREMENT_RECIPE
    recipes = {"shipped": shipped_recipe, "paper": replace(shipped_recipe, alpha=PAPER_ALPHA)}
    rows = check(args.checkpoint, args.shifts, recipes)
    command = "python -m experiments.check_measurement_gate " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    report = {"command": command.strip(), "checkpoint": str(args.checkpoint), "rows": rows}
    atomic_write(args.out, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

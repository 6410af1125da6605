"""Train a measurement CAMA (eq. 9-11) with the intervention ELBO (eq. 3), and predict with it.

    # the service's embedded default model: generator seed 0, the paper's 450/50 split
    python -m training.train_measurement --synthetic --seed 0 --out models/measurement_cama.pt
    # your own table (CSV or Parquet) with a declared schema (JSON, or --target/--parents/...)
    python -m training.train_measurement --csv data.csv --schema schema.json --out models/x.pt
    python -m training.train_measurement predict --checkpoint models/x.pt --csv new.csv --out pred.csv

Training maximises eq. 3 under do(m=0) on the labelled rows and keeps the weights with the best
validation accuracy (eq. 11 by importance sampling), as in the paper. Next to the checkpoint,
``<out>.replay.npz`` holds the training rows (``replay_*``) and a labelled canary (``canary_*``)
in model space (standardised): the clean replay set of eq. 8 and the promotion gate's canary. The
canary is the validation rows, or with ``--synthetic`` ``--canary-size`` further rows drawn from
the same structural equations (the gate's 0.5-point margin needs more than the paper's 50
validation rows, of which one is 2 points). The checkpoint's provenance holds the table's
schema, class names and standardisation statistics, so that ``predict`` applies the same
transform, and ``adapt_recipe``: the fine-tuning recipe (eq. 8) the service uses for this model
unless the operator or the job says otherwise (``cama.adapt.MEASUREMENT_RECIPE``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cama.checkpoint import load_checkpoint, sha256_file
from cama.measurement_model import MeasurementCama
from training.measurement_data import GeneratorConfig, make_dataset, schema_dict, to_frame
from training.measurement_schema import SchemaError, TableSchema, label_strings, read_table
from training.measurement_training import (
    TrainConfig,
    fit_and_save,
    load_encoding,
    predict_frame,
    replay_path,
    validation_split,
)

# --- command line -----------------------------------------------------------------------------


def _schema_from_args(args: argparse.Namespace) -> TableSchema:
    if args.schema is not None:
        return TableSchema.from_json(args.schema)
    if args.target is None:
        raise SchemaError(
            "bad_schema", "give --schema FILE or --target with --parents/--coparents/--children"
        )
    return TableSchema.from_dict(
        {
            "target": args.target,
            "parents": args.parents or "",
            "coparents": args.coparents or "",
            "children": args.children or "",
        }
    )


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.train_measurement",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", type=Path, help="training table (.csv or .parquet)")
    source.add_argument("--synthetic", action="store_true", help="the appendix-C generator (seed --seed)")
    parser.add_argument(
        "--schema", type=Path, default=None, help="schema JSON (see training.measurement_schema)"
    )
    parser.add_argument("--target", default=None)
    parser.add_argument("--parents", default=None, help="comma-separated column names")
    parser.add_argument("--coparents", default=None, help="comma-separated column names")
    parser.add_argument("--children", default=None, help="comma-separated column names")
    parser.add_argument(
        "--val-csv", type=Path, default=None, help="validation table (default: hold out rows)"
    )
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=Path("models/measurement_cama.pt"))
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument(
        "--seed", type=int, default=0, help="training seed (and generator seed with --synthetic)"
    )
    parser.add_argument("--m-pathway", choices=["affine", "appendix"], default="affine")
    parser.add_argument(
        "--canary-size",
        type=int,
        default=1000,
        help="with --synthetic: clean labelled rows drawn for the promotion gate's canary",
    )
    parser.add_argument("--tiny", action="store_true", help="a tiny model (smoke tests)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dry-run", action="store_true", help="one batch, one epoch")
    return parser


def _predict_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.train_measurement predict",
        description="Predict the target of every row of a table with a measurement checkpoint (eq. 11).",
    )
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument(
        "--csv", type=Path, required=True, help="table (.csv or .parquet); the target is optional"
    )
    parser.add_argument("--out", type=Path, default=None, help="predictions CSV (default: stdout)")
    parser.add_argument("--k", type=int, default=20, help="importance samples per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    return parser


def run_train(argv: list[str]) -> dict[str, Any]:
    """The ``train`` command: returns what it prints."""
    args = _train_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, dry_run=args.dry_run
    )
    overrides = {"m_pathway": args.m_pathway}
    if args.synthetic:
        ds = make_dataset(args.seed)
        schema = TableSchema.from_dict({**schema_dict(), "classes": [str(i) for i in range(5)]})
        provenance = {
            "dataset": "synthetic-measurement",
            "generator_seed": args.seed,
            "generator_config": asdict(GeneratorConfig()),
        }
        _, _, metrics = fit_and_save(
            to_frame(ds.train),
            to_frame(ds.val),
            schema,
            cfg,
            args.out,
            tiny=args.tiny,
            model_overrides=overrides,
            provenance=provenance,
            test_frame=to_frame(ds.test),
            canary_frame=to_frame(
                ds.equations.sample(
                    args.canary_size, np.random.default_rng(np.random.SeedSequence([args.seed, 2]))
                )
            ),
        )
    else:
        schema = _schema_from_args(args)
        frame = read_table(args.csv)
        if args.val_csv is not None:
            train_frame, val_frame = frame, read_table(args.val_csv)
        else:
            train_frame, val_frame = validation_split(frame, args.val_fraction, args.seed)
        provenance = {"dataset": "table", "source": args.csv.name, "source_sha256": sha256_file(args.csv)}
        _, _, metrics = fit_and_save(
            train_frame,
            val_frame,
            schema,
            cfg,
            args.out,
            tiny=args.tiny,
            model_overrides=overrides,
            provenance=provenance,
        )
    return {"checkpoint": str(args.out), "replay": str(replay_path(args.out)), **metrics}


def run_predict(argv: list[str]) -> dict[str, Any]:
    """The ``predict`` command: writes the predictions, returns a summary."""
    args = _predict_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, meta = load_checkpoint(args.checkpoint)
    if not isinstance(model, MeasurementCama):
        raise SchemaError("bad_schema", f"{args.checkpoint} is not a measurement CAMA checkpoint")
    encoding = load_encoding(meta.provenance)
    frame = read_table(args.csv)
    out = predict_frame(model, encoding, frame, k=args.k, seed=args.seed)
    summary: dict[str, Any] = {"rows": len(out)}
    if encoding.schema.target in frame.columns:
        truth = np.array(label_strings(frame[encoding.schema.target]))
        summary["accuracy"] = float(np.mean(out["predicted"].to_numpy(dtype=str) == truth))
    if args.out is None:
        out.to_csv(sys.stdout, index=False)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        out.to_csv(args.out, index=False)
        summary["predictions"] = str(args.out)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: ``[train] ...`` or ``predict ...``; schema problems exit with 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "train"
    if argv and argv[0] in ("train", "predict"):
        command = argv.pop(0)
    try:
        result = run_predict(argv) if command == "predict" else run_train(argv)
    except SchemaError as exc:
        print(json.dumps({"error": exc.as_dict()}), file=sys.stderr)
        return 2
    # predictions written to stdout keep it clean: the summary then goes to stderr
    to_stderr = command == "predict" and "predictions" not in result
    print(json.dumps(result), file=sys.stderr if to_stderr else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

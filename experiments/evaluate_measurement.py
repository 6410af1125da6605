"""Robustness of the measurement CAMA on the appendix-C synthetic data (paper section 4.2, figs 14-15).

    python -m experiments.evaluate_measurement                 # 5 generator seeds, S in {0.5, 1, 2, 3}
    python -m experiments.evaluate_measurement --dry-run --out-dir /tmp/m   # tiny smoke run

For each generator seed: the paper's split (450 train / 50 validation / 500 test), a CAMA trained
on clean data with eq. 3 and a DNN baseline ([64, 16, 32], dropout [.25, .25, .5], on the
concatenated A, C, X), both kept at their best validation accuracy. Then

- fig. 14, co-parent shift: C -> C + S sd(C) with X regenerated through the true f; CAMA vs DNN;
- fig. 15, child shift: X -> X + S sd(X); DNN, CAMA, and CAMA fine-tuned (eq. 8, ``cama.adapt``)
  on the unlabelled shifted test set with clean replay from the training rows, then evaluated on
  that same shifted test set (transductive, as test-time adaptation is) and on the clean test set
  ("clean after FT"). Fine-tuning runs for both m pathways from the same clean weights:
  ``affine`` (the default model) and ``appendix`` (the paper's concatenation).

Means, standard deviations and ranges over seeds go to ``docs/results/measurement_robustness.json``,
``measurement_fig14.png`` and ``measurement_fig15.png``, and the means to ``docs/results/metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from cama.adapt import MEASUREMENT_RECIPE
from cama.measurement_model import (
    MeasurementCama,
    MeasurementCamaConfig,
)
from cama.runtime import atomic_write
from experiments.measurement_study import (
    DNNTrainConfig,
    EvalConfig,
    dnn_accuracy,
    finetuned,
    shift_key,
    train_dnn,
)
from training.measurement_data import GeneratorConfig, Sample, make_dataset, schema_dict, to_frame
from training.measurement_schema import Encoded, Encoding, TableSchema
from training.measurement_training import TrainConfig, accuracy, train
from training.metrics import update_metrics

RESULTS = Path("docs/results")


def evaluate_seed(seed: int, cfg: EvalConfig) -> dict[str, float]:
    """Every measurement of one generator seed, flat keys such as ``child_shift.1.cama_ft``."""
    t0 = time.perf_counter()
    ds = make_dataset(seed, config=cfg.generator)
    schema = TableSchema.from_dict({**schema_dict(cfg.generator), "classes": [str(i) for i in range(5)]})
    encoding = Encoding.fit(to_frame(ds.train), schema)

    def enc(data: Sample) -> Encoded:
        return encoding.encode(to_frame(data))

    train_data, val_data, test = enc(ds.train), enc(ds.val), enc(ds.test)
    torch.manual_seed(seed)
    config = MeasurementCamaConfig.tiny() if cfg.tiny else MeasurementCamaConfig()
    config = replace(config, m_pathway=cfg.pathways[0], coparent_mechanism=cfg.coparent_mechanism)
    cama = MeasurementCama(config)
    train(cama, train_data, val_data, replace(cfg.train, seed=seed))
    dnn = train_dnn(train_data, val_data, cfg.dnn, seed)
    out = {"clean.cama": accuracy(cama, test, k=cfg.k), "clean.dnn": dnn_accuracy(dnn, test)}
    for s in cfg.shifts:
        key = shift_key(s)
        shifted = enc(ds.equations.shift_coparents(ds.test, s))
        out[f"coparent_shift.{key}.cama"] = accuracy(cama, shifted, k=cfg.k)
        out[f"coparent_shift.{key}.dnn"] = dnn_accuracy(dnn, shifted)
        shifted = enc(ds.equations.shift_children(ds.test, s))
        out[f"child_shift.{key}.cama"] = accuracy(cama, shifted, k=cfg.k)
        out[f"child_shift.{key}.dnn"] = dnn_accuracy(dnn, shifted)
        for pathway in cfg.pathways:
            name = "cama_ft" if pathway == cfg.pathways[0] else f"cama_ft_{pathway}"
            adapted = finetuned(cama, pathway, train_data, shifted, replace(cfg.finetune, seed=seed))
            out[f"child_shift.{key}.{name}"] = accuracy(adapted, shifted, k=cfg.k)
            out[f"clean_after_ft.{key}.{name}"] = accuracy(adapted, test, k=cfg.k)
    out["seconds"] = time.perf_counter() - t0
    return out


# --- summaries ----------------------------------------------------------------------------------------


def summarise(per_seed: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean, standard deviation, min and max over seeds of every key."""
    out = {}
    for key in per_seed[0]:
        values = np.array([run[key] for run in per_seed])
        out[key] = {
            "mean": float(values.mean()),
            "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "min": float(values.min()),
            "max": float(values.max()),
        }
    return out


def metric_values(summary: dict[str, dict[str, float]], cfg: EvalConfig) -> dict[str, float]:
    """The means under the ``measurement.*`` keys of ``docs/results/metrics.json``."""
    values = {
        f"measurement.{k}": v["mean"]
        for k, v in summary.items()
        if not k.startswith(("clean_after_ft", "seconds"))
    }
    for name in ("cama_ft", *(f"cama_ft_{p}" for p in cfg.pathways[1:])):
        per_shift = [summary[f"clean_after_ft.{shift_key(s)}.{name}"]["mean"] for s in cfg.shifts]
        suffix = "cama" if name == "cama_ft" else name.replace("cama_ft", "cama")
        values[f"measurement.clean_after_ft.{suffix}"] = float(np.mean(per_shift))
    return values


def check_targets(summary: dict[str, dict[str, float]], cfg: EvalConfig) -> list[dict[str, Any]]:
    """The measurement figures' targets (docs/measurement.md), each with the numbers that meet or
    miss it (means over seeds, points)."""

    def m(key: str) -> float:
        return 100.0 * summary[key]["mean"]

    checks: list[dict[str, Any]] = []
    gap = m("clean.cama") - m("clean.dnn")
    checks.append(
        {
            "target": "clean: CAMA at most 2 points below the DNN",
            "cama": m("clean.cama"),
            "dnn": m("clean.dnn"),
            "cama_minus_dnn": gap,
            "met": gap >= -2.0,
        }
    )
    for s in cfg.shifts:
        key = shift_key(s)
        drop = m("clean.cama") - m(f"coparent_shift.{key}.cama")
        dnn_drop = m("clean.dnn") - m(f"coparent_shift.{key}.dnn")
        checks.append(
            {
                "target": f"co-parent shift S={key}: CAMA within 3 points of its clean accuracy",
                "cama": m(f"coparent_shift.{key}.cama"),
                "cama_drop": drop,
                "dnn_drop": dnn_drop,
                "met": drop <= 3.0,
            }
        )
    for s in cfg.shifts:
        if s < 1.0:
            continue
        key = shift_key(s)
        ft, dnn = m(f"child_shift.{key}.cama_ft"), m(f"child_shift.{key}.dnn")
        checks.append(
            {
                "target": f"child shift S={key}: CAMA+FT above the DNN",
                "cama_ft": ft,
                "dnn": dnn,
                "met": ft > dnn,
            }
        )
    for s in cfg.shifts:
        key = shift_key(s)
        after = m(f"clean_after_ft.{key}.cama_ft")
        checks.append(
            {
                "target": f"clean accuracy after FT on S={key} within 1 point",
                "clean": m("clean.cama"),
                "after_ft": after,
                "met": abs(after - m("clean.cama")) <= 1.0,
            }
        )
    return checks


def format_tables(summary: dict[str, dict[str, float]], cfg: EvalConfig) -> str:
    """Fig. 14 and fig. 15 as text tables, accuracy in % as mean ± sd over seeds (S=0: clean)."""

    def table(title: str, columns: dict[str, tuple[str, str | None]]) -> list[str]:
        """``columns``: name -> (key pattern over S, key of the clean value at S=0 or None)."""
        widths = [max(len(name), 11) for name in columns]
        rows = [title, "   S  " + "  ".join(f"{n:>{w}}" for n, w in zip(columns, widths, strict=True))]
        for s in (0.0, *cfg.shifts):
            cells = []
            for (pattern, clean), w in zip(columns.values(), widths, strict=True):
                key = pattern.format(s=shift_key(s)) if s > 0 else clean
                v = summary[key] if key else None
                text = f"{100 * v['mean']:5.1f} ± {100 * v['std']:3.1f}" if v else "-"
                cells.append(f"{text:>{w}}")
            rows.append(f"{shift_key(s):>4}  " + "  ".join(cells))
        return rows

    fig14: dict[str, tuple[str, str | None]] = {
        "DNN": ("coparent_shift.{s}.dnn", "clean.dnn"),
        "CAMA": ("coparent_shift.{s}.cama", "clean.cama"),
    }
    fig15: dict[str, tuple[str, str | None]] = {
        "DNN": ("child_shift.{s}.dnn", "clean.dnn"),
        "CAMA": ("child_shift.{s}.cama", "clean.cama"),
    }
    for p in cfg.pathways:
        name = "cama_ft" if p == cfg.pathways[0] else f"cama_ft_{p}"
        fig15[f"CAMA+FT {p}"] = (f"child_shift.{{s}}.{name}", None)
        fig15[f"clean after FT {p}"] = (f"clean_after_ft.{{s}}.{name}", None)
    n = len(cfg.seeds)
    return "\n".join(
        [
            *table(f"Fig. 14, co-parent shift: test accuracy %, mean ± sd over {n} seeds", fig14),
            "",
            *table(f"Fig. 15, child shift: test accuracy %, mean ± sd over {n} seeds", fig15),
        ]
    )


def plot(summary: dict[str, dict[str, float]], cfg: EvalConfig, out_dir: Path, tag: str = "") -> list[Path]:
    """``measurement_fig14.png`` and ``measurement_fig15.png``: means with the seeds' min-max band."""
    xs = [0.0, *cfg.shifts]

    def series(pattern: str, clean: str | None) -> tuple[list[float], np.ndarray]:
        keys = ([clean] if clean else []) + [pattern.format(s=shift_key(s)) for s in cfg.shifts]
        pts = xs if clean else list(cfg.shifts)
        return pts, np.array([[summary[k][f] for k in keys] for f in ("mean", "min", "max")])

    Line = tuple[str, str, str | None, str]  # label, key pattern over S, clean key, line style
    figures: dict[str, tuple[str, list[Line]]] = {
        "measurement_fig14.png": (
            "Fig. 14: co-parent shift (C, X regenerated by f)",
            [
                ("DNN", "coparent_shift.{s}.dnn", "clean.dnn", "-"),
                ("CAMA", "coparent_shift.{s}.cama", "clean.cama", "-"),
            ],
        ),
        "measurement_fig15.png": (
            "Fig. 15: child shift (X)",
            [
                ("DNN", "child_shift.{s}.dnn", "clean.dnn", "-"),
                ("CAMA", "child_shift.{s}.cama", "clean.cama", "-"),
                ("CAMA + FT (affine m)", "child_shift.{s}.cama_ft", None, "-"),
                *[
                    (f"CAMA + FT ({p} m)", f"child_shift.{{s}}.cama_ft_{p}", None, "-")
                    for p in cfg.pathways[1:]
                ],
                ("clean test after FT (affine m)", "clean_after_ft.{s}.cama_ft", None, "--"),
            ],
        ),
    }
    written = []
    for name, (title, lines) in figures.items():
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for label, pattern, clean, style in lines:
            pts, (mean, lo, hi) = series(pattern, clean)
            ax.plot(pts, mean, style, marker="o", label=label)
            ax.fill_between(pts, lo, hi, alpha=0.15)
        ax.set_title(f"{title}, {len(cfg.seeds)} seeds (band: min-max)", fontsize=9)
        ax.set_xlabel("shift S (standard deviations of the shifted variable)")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / name.replace(".png", f"{tag}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=list(EvalConfig.seeds))
    parser.add_argument("--shifts", type=float, nargs="+", default=list(EvalConfig.shifts))
    parser.add_argument("--k", type=int, default=EvalConfig.k, help="importance samples per class")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--no-metrics", action="store_true", help="do not update docs/results/metrics.json")
    parser.add_argument(
        "--quad-scale",
        type=float,
        default=GeneratorConfig.quad_scale,
        help="generator's quadratic scale (a sensitivity check; metrics only for the default)",
    )
    parser.add_argument(
        "--coparent-mechanism",
        choices=["mlp", "mlp_quadratic", "quadratic"],
        default=EvalConfig.coparent_mechanism,
        help="how c enters p(x|y,c,z,m) (MeasurementCamaConfig; an ablation: metrics only for mlp)",
    )
    parser.add_argument("--tag", default="", help="suffix of the output files, e.g. _q0.1")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dry-run", action="store_true", help="tiny models, one seed, few steps; no metrics")
    parser.add_argument("--replot", action="store_true", help="redraw tables and plots from the saved JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    generator = replace(GeneratorConfig(), quad_scale=args.quad_scale)
    cfg = EvalConfig(
        seeds=tuple(args.seeds),
        shifts=tuple(args.shifts),
        k=args.k,
        generator=generator,
        coparent_mechanism=args.coparent_mechanism,
    )
    if args.dry_run:
        cfg = replace(
            cfg,
            seeds=cfg.seeds[:1],
            shifts=(1.0,),
            k=2,
            tiny=True,
            train=TrainConfig(epochs=1, val_every=1, val_k=2),
            finetune=replace(MEASUREMENT_RECIPE, epochs=1, batch_size=250),
            dnn=DNNTrainConfig(epochs=2),
        )
    if args.replot:
        report = json.loads((args.out_dir / f"measurement_robustness{args.tag}.json").read_text())
        saved = report["config"]
        cfg = replace(
            cfg, seeds=tuple(saved["seeds"]), shifts=tuple(saved["shifts"]), pathways=tuple(saved["pathways"])
        )
        finish(report["per_seed"], cfg, args.out_dir, args.tag, report["command"], config=saved)
        return
    command = "python -m experiments.evaluate_measurement " + " ".join(sys.argv[1:] if argv is None else argv)
    per_seed = []
    for seed in cfg.seeds:
        per_seed.append(evaluate_seed(seed, cfg))
        print(f"seed {seed}: " + json.dumps({k: round(v, 3) for k, v in per_seed[-1].items()}), flush=True)
    values = finish(per_seed, cfg, args.out_dir, args.tag, command)
    ablation = generator != GeneratorConfig() or args.coparent_mechanism != "mlp"
    if not (args.no_metrics or args.dry_run or ablation):
        update_metrics(values)


def finish(
    per_seed: list[dict[str, float]],
    cfg: EvalConfig,
    out_dir: Path,
    tag: str,
    command: str,
    config: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Print the tables and targets, write the JSON report and the plots; return the metrics."""
    summary = summarise(per_seed)
    print(format_tables(summary, cfg))
    checks = check_targets(summary, cfg)
    for c in checks:
        numbers = {k: round(v, 2) for k, v in c.items() if isinstance(v, float)}
        print(("MET    " if c["met"] else "MISSED ") + c["target"] + "  " + json.dumps(numbers))
    out_dir.mkdir(parents=True, exist_ok=True)
    values = metric_values(summary, cfg)
    report = {
        "command": command,
        "config": config or asdict(cfg),
        "per_seed": per_seed,
        "summary": summary,
        "metrics": values,
        "targets": checks,
    }
    atomic_write(out_dir / f"measurement_robustness{tag}.json", json.dumps(report, indent=2) + "\n")
    plot(summary, cfg, out_dir, tag)
    return values


if __name__ == "__main__":
    main()

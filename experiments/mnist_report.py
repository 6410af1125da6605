"""The MNIST evaluation's outputs, from its cache: flat metrics, tables (``mnist.md``) and plots."""

from __future__ import annotations

import sys
from collections.abc import Collection

from cama.runtime import atomic_write
from experiments.mnist_sections import RANGES, SHIFTS, TENT_LRS, UNSEEN, VARIANTS, Evaluator
from training.metrics import update_metrics

OTHER_RECIPE_MARK = " †"


def summary_tables(data: dict[str, float], other_recipe: Collection[str] = ()) -> list[str]:
    """Fig. 7 and the other manipulations as tables, both m pathways side by side; a figure in
    ``other_recipe`` (fine-tuned with another recipe than the run's) is marked with a dagger."""

    def _row(label: str, keys: list[str], data: dict[str, float]) -> str | None:
        if not any(k in data for k in keys):
            return None
        mark = {k: OTHER_RECIPE_MARK if k in other_recipe else "" for k in keys}
        cells = [f"{data[k]:.4f}{mark[k]}" if k in data else "" for k in keys]
        return "| " + " | ".join([label, *cells]) + " |"

    lines: list[str] = []
    for name, title in (
        ("cama", "transform m pathway (`cama`)"),
        ("cama_paper", "appendix-C pathway (`cama_paper`)"),
    ):
        lines += [
            f"## Fig. 7, {title}",
            "",
            "| test set | DNN | BN-CNN dense head | + TENT | BN-CNN global pool | + TENT | CAMA "
            "| + FT vertical | + FT horizontal |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for shift in SHIFTS:
            for r in RANGES:
                cols = ["dnn", "bncnn", "tent", "bncnn_gap", "tent_gap", name, f"{name}_ft_v", f"{name}_ft_h"]
                row = _row(f"{shift} {r}", [f"mnist.{shift}.{r}.{c}" for c in cols], data)
                if row:
                    lines.append(row)
        lines.append("")
    lines += [
        "## Other manipulations (fine-tuned on the unlabelled adapt half, scored on the other half)",
        "",
        "| test set | DNN | BN-CNN dense head | + TENT | BN-CNN global pool | + TENT | CAMA | CAMA + FT "
        "| appendix-C | appendix-C + FT |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for manipulation, level in (("noise", 0.3), *UNSEEN):
        prefix = f"mnist.{manipulation}.{level:g}"
        cols = [
            "dnn",
            "bncnn",
            "tent",
            "bncnn_gap",
            "tent_gap",
            "cama",
            "cama_ft",
            "cama_paper",
            "cama_paper_ft",
        ]
        row = _row(f"{manipulation} {level:g}", [f"{prefix}.{c}" for c in cols], data)
        if row:
            lines.append(row)
    lr_rows = [
        _row(
            f"{shift} 0.3, {label}",
            [f"mnist.{shift}.0.3.{name}_lr.{lr:g}" for lr in TENT_LRS] + [f"mnist.{shift}.0.3.cama_ft_{tag}"],
            data,
        )
        for shift, tag in SHIFTS.items()
        for name, label in (("tent", "dense head"), ("tent_gap", "global pool"))
    ]
    if any(lr_rows):
        lines += [
            "",
            "## TENT's learning rate (`--sections tent_lr`; the best of these is chosen with the labels)",
            "",
            "| test set, BN-CNN | " + " | ".join(f"lr {lr:g}" for lr in TENT_LRS) + " | CAMA + FT |",
            "| --- |" + " ---: |" * (len(TENT_LRS) + 1),
            *[row for row in lr_rows if row],
        ]
    lines += [
        "",
        "## Fig. 10, CAMA trained with shift-augmented data (eq. 5, range 0.5)",
        "",
        "| test set | aug. vertical | + FT | aug. horizontal | + FT |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for shift in SHIFTS:
        for r in RANGES:
            cols = ["cama_aug_v", "cama_aug_v_ft", "cama_aug_h", "cama_aug_h_ft"]
            row = _row(f"{shift} {r}", [f"mnist.fig10.{shift}.{r}.{c}" for c in cols], data)
            if row:
                lines.append(row)
    return lines


def write_outputs(ev: Evaluator) -> None:
    """Flat metrics, headline aliases, a markdown table and plots, from the cache."""
    data = {k: float(v["value"]) for k, v in ev.cache.data.items()}
    metrics = dict(data)
    for tag in SHIFTS.values():
        for name in VARIANTS:
            per_range = [
                v
                for k, v in data.items()
                if k.startswith(f"mnist.clean_after_ft_{tag}.") and k.endswith(f".{name}")
            ]
            if per_range:
                metrics[f"mnist.clean_after_ft_{tag}.{name}"] = min(per_range)
    for name in VARIANTS:
        for key_from, key_to in (
            (f"mnist.clean_after_ft_noise_0.3.{name}", f"mnist.clean_after_ft_noise.{name}"),
        ):
            if key_from in data:
                metrics[key_to] = data[key_from]
    update_metrics(metrics, ev.out / "metrics.json")
    from experiments.plots import plot_mnist

    plot_mnist(data, ev.out)
    intro = (
        "Accuracy (fraction) on the scoring half of the manipulated MNIST test set, K=10 importance "
        "samples per class for CAMA; fine-tuning (FT) uses the other, unlabelled half. The protocol "
        "and the device of each figure are below the tables (`## Every figure`); the plots are beside "
        "this file."
    )
    other = sorted(k for k in ev.cache.data if ev.cache.recipe_of(k) not in (None, ev.recipe))
    if other:
        intro += (
            f" {OTHER_RECIPE_MARK.strip()} marks a figure fine-tuned with another recipe than this run's"
            f" (`{ev.recipe}`): {len(other)} of the cached figures; their recipe is in the `recipe`"
            " column of `## Every figure`."
        )
    lines = ["# MNIST results", "", intro, "", *summary_tables(data, set(other)), ""]
    lines += [
        "## Every figure",
        "",
        "Every figure measured so far, from the cache `mnist_eval.json` beside this file (an entry is",
        "measured once and kept until `--force`; `device` says where, `n` how many images were scored",
        "where fewer than the whole 5000-image half, `model` the first 12 hex digits of the SHA-256 of",
        "the CAMA checkpoint it scored, `recipe` the adaptation recipe's settings, empty for a figure",
        "without fine-tuning). Last written by",
        f"`{' '.join(['python -m experiments.evaluate_mnist', *sys.argv[1:]])}` "
        f"(K={ev.cfg.k}, fine-tuning {ev.cfg.ft.as_dict()}).",
        "",
        "| key | value | seconds | device | n | model | recipe |",
        "| --- | ---: | ---: | --- | ---: | --- | --- |",
    ]
    for key in sorted(ev.cache.data):
        entry = ev.cache.data[key]
        lines.append(
            f"| `{key}` | {entry['value']:.4f} | {entry.get('seconds', '')} | {entry.get('device', 'cpu')} "
            f"| {entry.get('n_score', '')} | {entry.get('model', '')} | {ev.cache.recipe_of(key) or ''} |"
        )
    atomic_write(ev.out / "mnist.md", "\n".join(lines) + "\n")

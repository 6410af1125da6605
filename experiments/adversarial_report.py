"""The adversarial evaluation's outputs from its caches: the figures per data set, the sanity
checks, the tables of ``docs/results/adversarial.md``, the plots (figs. 11-13) and the ``adv.*``
keys of ``docs/results/metrics.json``."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import matplotlib

from experiments.adversarial_protocol import (
    ATTACKS,
    BASELINE,
    CHANCE_EPS,
    CHANCE_LEVEL,
    COSTLY_EPS,
    EPS,
    METHODS,
    MONOTONE_SLACK,
    PGD_STEPS,
    STEPS_EPS,
    eps_key,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from cama.runtime import atomic_write
from experiments.eval_cache import Cache
from training.metrics import update_metrics

# --- outputs --------------------------------------------------------------------------------------------


def figures(dataset: str, out_dir: Path) -> dict[str, float]:
    """Flat keys of one dataset's cache; the measurement figures are means over the seeds measured."""
    path = out_dir / f"adversarial_{dataset}_eval.json"
    if not path.exists():
        return {}
    data = {k: float(v["value"]) for k, v in Cache(path, False).data.items() if not k.endswith(".done")}
    if dataset != "measurement":
        return data
    groups: dict[str, list[float]] = {}
    for key, value in data.items():
        parts = key.split(".")
        groups.setdefault(".".join(parts[:2] + parts[3:]), []).append(value)
    return {k: float(np.mean(v)) for k, v in groups.items()}


def summary(m: dict[str, float], dataset: str) -> dict[str, float]:
    """``clean_after_ft.cama`` (the lowest) and, for images, the sanity checks as 1 (pass) / 0 (fail)."""
    out: dict[str, float] = {}
    for suffix in ("", "_adapted"):
        methods = {f"cama_ft{suffix}", f"cama_ft_eot{suffix}"}
        clean_after = [
            v
            for k, v in m.items()
            if k.startswith(f"adv.{dataset}.clean_after_ft.") and k.rsplit(".", 1)[1] in methods
        ]
        if clean_after:
            out[f"adv.{dataset}.clean_after_ft{suffix}.cama"] = min(clean_after)
    if dataset == "measurement":
        return out
    checks = sanity_checks(m, dataset)
    out.update({f"adv.{dataset}.sanity.{name}": float(ok) for name, (ok, _) in checks.items()})
    return out


def sanity_checks(m: dict[str, float], dataset: str = "mnist") -> dict[str, tuple[bool, str]]:
    """Each sanity check measured for an image data set: (passed, what was compared)."""
    checks: dict[str, tuple[bool, str]] = {}
    rises = []
    pre = f"adv.{dataset}"
    for attack in ATTACKS:
        for method in (BASELINE[dataset], "cama", "cama_fixed", "cama_eot"):
            values = [m.get(f"{pre}.{attack}.{eps_key(e)}.{method}") for e in (*EPS[dataset], CHANCE_EPS)]
            known = [v for v in values if v is not None]
            rises += [b - a for a, b in itertools.pairwise(known)]
    if rises:
        checks["monotone"] = (
            max(rises) <= MONOTONE_SLACK,
            f"largest rise between neighbouring eps {max(rises):+.3f}",
        )
    chance = {k: v for k, v in m.items() if k.startswith(f"{pre}.pgd.{eps_key(CHANCE_EPS)}.")}
    if chance:
        checks["chance_at_0.5"] = (
            max(chance.values()) <= CHANCE_LEVEL,
            ", ".join(f"{k.split('.')[-1]} {v:.3f}" for k, v in chance.items()),
        )
    gains = []
    at = eps_key(STEPS_EPS[dataset])
    for method in (BASELINE[dataset], "cama_fixed"):
        few = [
            v for k, v in m.items() if k.startswith(f"{pre}.sanity.pgd{PGD_STEPS[dataset]}.{at}.{method}.")
        ]
        many = [
            v
            for k, v in m.items()
            if k.startswith(f"{pre}.sanity.pgd{10 * PGD_STEPS[dataset]}.{at}.{method}.")
        ]
        if few and many:
            gains.append((method, many[0] - few[0]))
    if gains:
        checks["more_steps"] = (
            all(g <= 0.01 for _, g in gains),
            ", ".join(f"{name} {g:+.3f}" for name, g in gains),
        )
    transferred = [
        (e, m[f"{pre}.pgd.{eps_key(e)}.cama_transfer"], m[f"{pre}.pgd.{eps_key(e)}.cama_eot"])
        for e in COSTLY_EPS[dataset]
        if f"{pre}.pgd.{eps_key(e)}.cama_transfer" in m and f"{pre}.pgd.{eps_key(e)}.cama_eot" in m
    ]
    if transferred:
        checks["transfer_weaker"] = (
            all(t >= w for _, t, w in transferred),
            ", ".join(f"eps {e:g}: transfer {t:.3f} vs EOT {w:.3f}" for e, t, w in transferred),
        )
    diffs = [
        (
            e,
            m[f"{pre}.crosscheck.pgd.{eps_key(e)}.ours"],
            m[f"{pre}.crosscheck.pgd.{eps_key(e)}.foolbox"],
        )
        for e in COSTLY_EPS[dataset]
        if f"{pre}.crosscheck.pgd.{eps_key(e)}.foolbox" in m
    ]
    if diffs:
        checks["foolbox_within_1pt"] = (
            all(abs(o - f) <= 0.01 for _, o, f in diffs),
            ", ".join(f"eps {e:g}: ours {o:.3f}, foolbox {f:.3f}" for e, o, f in diffs),
        )
    return checks


def methods_of(dataset: str) -> tuple[str, ...]:
    """The figure's methods, the discriminative baseline under its data set's name."""
    return tuple(BASELINE[dataset] if method == "dnn" else method for method in METHODS)


def table(m: dict[str, float], dataset: str) -> str:
    """Markdown: accuracy per attack and eps (rows) and method (columns)."""
    methods = methods_of(dataset)
    lines = [
        f"| attack | eps | {' | '.join(methods)} |",
        "|---|---:|" + "---:|" * len(methods),
    ]
    for attack in ATTACKS:
        for eps in EPS[dataset]:
            cells = [m.get(f"adv.{dataset}.{attack}.{eps_key(eps)}.{method}") for method in methods]
            lines.append(
                f"| {attack} | {eps:g} | " + " | ".join("" if c is None else f"{c:.3f}" for c in cells) + " |"
            )
    return "\n".join(lines)


def plot(m: dict[str, float], dataset: str, path: Path) -> None:
    """Accuracy against eps, one panel per attack, one line per method (figs. 11 and 13)."""
    fig, axes = plt.subplots(1, len(ATTACKS), figsize=(10, 3.8), sharey=True)
    for ax, attack in zip(axes, ATTACKS, strict=True):
        for method in methods_of(dataset):
            points = [
                (e, m[f"adv.{dataset}.{attack}.{eps_key(e)}.{method}"])
                for e in EPS[dataset]
                if f"adv.{dataset}.{attack}.{eps_key(e)}.{method}" in m
            ]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=method)
        ax.set_title(f"{dataset}: {attack.upper()}")
        ax.set_xlabel("eps (L-inf)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out_dir: Path, *, metrics_file: bool = True) -> dict[str, float]:
    """The table, the plots and the ``adv.*`` keys of metrics.json from the caches."""
    sections, metrics = [], {}
    for dataset in EPS:
        m = figures(dataset, out_dir)
        if not m:
            continue
        m.update(summary(m, dataset))
        metrics.update(m)
        plot(m, dataset, out_dir / f"adversarial_{dataset}.png")
        sections.append(f"## {dataset}\n\n{table(m, dataset)}\n")
        extra = {k: v for k, v in m.items() if ".cama_transfer" in k or "adaptive" in k or "clean" in k}
        sections.append("\n".join(f"- `{k}`: {v:.3f}" for k, v in sorted(extra.items())) + "\n")
        if dataset != "measurement":
            checks = sanity_checks(m, dataset)
            sections.append(
                "Sanity checks:\n\n"
                + "\n".join(
                    f"- {name}: {'pass' if ok else 'FAIL'} ({what})" for name, (ok, what) in checks.items()
                )
                + "\n"
            )
    text = (
        "# Adversarial robustness\n\nWritten by `python -m experiments.evaluate_adversarial`; the protocol"
        " is in that module's docstring.\n\n"
    )
    atomic_write(out_dir / "adversarial.md", text + "\n".join(sections))
    finite = {k: v for k, v in metrics.items() if math.isfinite(v) and ".sanity.pgd" not in k}
    if metrics_file:
        update_metrics(finite)
    return finite

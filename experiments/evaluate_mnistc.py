"""MNIST-C (Mu & Gilmer 2019) as a test of corruptions no model here was trained or tuned on.

    python -m experiments.evaluate_mnistc                         # every corruption, n = 100, 500, 2000
    python -m experiments.evaluate_mnistc --corruptions fog stripe --ns 500
    python -m experiments.evaluate_mnistc --sections              # only rewrite table, plot and metrics
    python -m experiments.evaluate_mnistc --suite validation      # the protocol on validation data

Protocol, per corruption: the 10,000 corrupted test images are split into an adapt half and a
scoring half (the seeded split of every MNIST figure, ``experiments.experiment.halves``); each method
adapts on the first ``n`` images of the adapt half, unlabelled, and is scored on the whole scoring
half (``--score-limit`` scores fewer).

Methods (keys ``mnistc.<corruption>.<method>.n<N>``, and ``mnistc.mean.<method>.n<N>``):

- ``dnn``, ``bncnn_gap``, ``bncnn_flat``: the appendix-C DNN and the two BN-CNNs, not adapted
  (BatchNorm on its training statistics); ``dnn_generic``: the DNN trained with the generic
  manipulations CAMA is trained with (``--augment generic``), where that checkpoint exists;
- ``tent_gap``, ``tent_flat``: TENT on each BN-CNN adapts on the ``n`` images (batches of 100, one
  entropy step each) and then scores with its parameters frozen (BatchNorm on each test batch's
  statistics); ``tent_gap_online``, ``tent_flat_online`` keep adapting while they score, as TENT
  is usually run. TENT's step size is chosen per network on the validation split of the training
  set under ``training.manipulations``' named manipulations (``tent_lr`` below), never here;
- ``cama``: the served CAMA (``--checkpoint``), answered as ``POST /predict`` answers (eq. 6,
  K = 10 behind the first-sample screen, ``cama.objectives.SCREEN_MARGIN``);
- ``cama_ft``: the served CAMA after ``POST /adapt``'s own code path on the ``n`` images
  (``cama.adapt.adapt_batch``: a fifth held out for the gate, the checkpoint's ``adapt_recipe``,
  the service's default gate, replay and canary from ``--serving-data``); a refused job scores as
  the unadapted model; ``cama_adapted`` scores what the job produced before the gate's verdict.

``--suite validation`` runs the same protocol on ``training.manipulations``' named manipulations of
the validation split of MNIST's training set (never the test set, never MNIST-C), plus a batch of
uniform noise that the gate must refuse: the recipe's step budget and the gate's thresholds are
chosen there (``--recipe`` overrides the checkpoint's recipe), and its outputs are
``mnistc_val_eval.json``, ``mnistc_val.md`` and ``mnistc_val.png``.

Also ``mnistc.clean_after_ft.min.n500`` (the lowest clean accuracy, on the clean scoring half,
after any of the 15 adaptations on 500 images), ``mnistc.adapt_seconds.median.n500`` (wall time of
one adaptation job, gate included) and ``mnistc.gate_accepted.n<N>`` (accepted jobs). Figures are
cached in ``docs/results/mnistc_eval.json`` (``experiments.eval_cache``); the table goes to
``docs/results/mnistc.md``, the plot to ``docs/results/mnistc.png``, the keys to ``metrics.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cama.adapt import AdaptOutcome, FinetuneConfig, GateConfig, GateEvaluation, promotion_gate
from cama.checkpoint import load_checkpoint, sha256_file
from cama.image_model import ImageCama
from cama.runtime import atomic_write, resolve_device
from experiments.eval_cache import Cache, MissingModelError, recipe_id
from experiments.experiment import adapt_as_served, halves
from store.data import ServingData
from training.accuracy import served_accuracy
from training.baselines import evaluate_accuracy, load_baseline
from training.data import (
    MNISTC_CORRUPTIONS,
    Split,
    add_data_dir_argument,
    load_mnist,
    load_mnist_c,
    validation_split,
)
from training.manipulations import named
from training.metrics import update_metrics
from training.tent import tent_accuracy

RESULTS = Path("docs/results")
NS = (100, 500, 2000)
TENT_BATCH = 100
TENT_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
# validation manipulations for TENT's step size: training.manipulations' named ones, never MNIST-C
TENT_VALIDATION = (
    ("noise", 0.3),
    ("contrast", 0.4),
    ("saltpepper", 0.1),
    ("blur", 1.0),
    ("rotation", 30.0),
    ("vshift", 0.3),
    ("hshift", 0.3),
)
# further generic manipulations in the gate's validation suite only (TENT's step size is chosen on
# TENT_VALIDATION alone): shapes and levels set before any was measured, none modelled on MNIST-C
GATE_VALIDATION = (
    ("rotation", 45.0),
    ("blobs", 0.2),
    ("veil", 0.7),
    ("elastic", 3.0),
    ("invert", 1.0),
)
METHODS = (
    "dnn",
    "dnn_generic",
    "bncnn_gap",
    "bncnn_flat",
    "tent_gap",
    "tent_flat",
    "tent_gap_online",
    "tent_flat_online",
    "cama",
    "cama_adapted",
    "cama_ft",
)
POISONED = "uniform_noise"  # validation suite: images of uniform noise, which the gate must refuse
PUBLISHED = {"CNN (Mu & Gilmer 2019)": 0.759, "test-time Hopfield layer (Sargolzaei & Rueda 2024)": 0.898}


@dataclass
class Setup:
    """The data, the models and the cache of one run."""

    args: argparse.Namespace
    prefix: str  # "mnistc", or "mnistc_val" for the validation suite
    sets: dict[str, np.ndarray]  # manipulated images by name, all with ``labels``
    labels: np.ndarray
    clean_score: Split
    validation: Split
    cama: ImageCama
    digest: str
    recipe: FinetuneConfig
    gate: GateConfig
    serving: ServingData
    cache: Cache
    device: torch.device
    baselines: dict[str, torch.nn.Module]

    def baseline(self, name: str) -> torch.nn.Module:
        if name not in self.baselines:
            path = Path(getattr(self.args, name))
            if not path.exists():
                raise MissingModelError(f"no baseline checkpoint {path}")
            self.baselines[name] = load_baseline(path)[0].to(self.device).eval()
        return self.baselines[name]

    @property
    def ns(self) -> list[int]:
        """The batch sizes reported: the protocol's and any other this run measured."""
        return sorted({*NS, *self.args.ns})

    @property
    def names(self) -> list[str]:
        """The sets that count in the means (the validation suite's uniform noise is a poisoned
        batch that the gate must refuse, not a manipulation to score)."""
        return [name for name in self.sets if name != POISONED]

    def halves(self, corruption: str) -> tuple[Split, Split]:
        """(adapt half, scoring half) of one corruption."""
        x, y = self.sets[corruption], self.labels
        adapt_idx, score_idx = halves(Split(x, y))
        n = self.args.score_limit
        return Split(x[adapt_idx], y[adapt_idx]), Split(x[score_idx][:n], y[score_idx][:n])


def gate_id(gate: GateConfig) -> str:
    """Every setting of the promotion gate, e.g. ``"k=10,max_clean_drop=0.005,..."``."""
    return ",".join(f"{name}={value}" for name, value in sorted(dataclasses.asdict(gate).items()))


def adapt_like_the_service(s: Setup, adapt_x: np.ndarray) -> tuple[ImageCama, AdaptOutcome]:
    """A copy of the served CAMA after ``POST /adapt``'s code path on ``adapt_x`` (unlabelled),
    kept also where the gate refuses it (the caller scores it as ``cama_adapted``)."""
    return adapt_as_served(s.cama, adapt_x, s.recipe, s.gate, s.serving, keep_refused=True)


def tent_lr(s: Setup, arch: str) -> float:
    """TENT's step size for ``arch``: the best mean accuracy over ``TENT_VALIDATION`` on the
    validation split (adapt on its first 500 images, score the rest with the parameters frozen)."""
    n_adapt = min(500, len(s.validation) // 2)
    key = f"mnistc.tent_lr.{arch}"  # the same choice for both suites

    def choose() -> float:
        val = s.validation
        rng = np.random.default_rng(0)
        sets = [named(name, level)(val.x, rng) for name, level in TENT_VALIDATION]
        means = {}
        for lr in TENT_LRS:
            accs = [
                tent_accuracy(
                    s.baseline(arch),
                    x[n_adapt:],
                    val.y[n_adapt:],
                    TENT_BATCH,
                    lr=lr,
                    adapt_x=x[:n_adapt],
                    online=False,
                )
                for x in sets
            ]
            means[lr] = float(np.mean(accs))
            print(f"  tent {arch} lr {lr:g}: validation mean {means[lr]:.4f}", flush=True)
        return max(means, key=lambda lr: means[lr])

    return s.cache.get(key, choose, validation=[f"{n} {v:g}" for n, v in TENT_VALIDATION])


def measure(s: Setup, corruption: str) -> None:
    """Every method of ``--methods`` on one corruption, for each ``n`` of ``--ns``."""
    c, methods = s.cache, set(s.args.methods)
    adapt, score = s.halves(corruption)
    prefix = f"{s.prefix}.{corruption}"
    for method in ("dnn", "dnn_generic", "bncnn_gap", "bncnn_flat"):
        if method not in methods:
            continue
        try:
            network = s.baseline(method)
        except MissingModelError as exc:
            print(f"{prefix}.{method} skipped: {exc}", flush=True)
            continue
        value = c.get(f"{prefix}.{method}", partial(evaluate_accuracy, network, score.x, score.y))
        for n in s.args.ns:  # not adapted: the same figure for every n
            c.put(f"{prefix}.{method}.n{n}", {"value": value, "n_adapt": 0})
    if "cama" in methods:
        value = c.get(f"{prefix}.cama", partial(served_accuracy, s.cama, score.x, score.y), model=s.digest)
        for n in s.args.ns:
            c.put(f"{prefix}.cama.n{n}", {"value": value, "model": s.digest, "n_adapt": 0})
    for n in s.args.ns:
        adapt_x = adapt.x[:n]
        for arch, tag in (("bncnn_gap", "gap"), ("bncnn_flat", "flat")):
            for online in (False, True):
                method = f"tent_{tag}" + ("_online" if online else "")
                if method not in methods:
                    continue
                lr = tent_lr(s, arch)
                c.get(
                    f"{prefix}.{method}.n{n}",
                    partial(
                        tent_accuracy,
                        s.baseline(arch),
                        score.x,
                        score.y,
                        TENT_BATCH,
                        lr=lr,
                        adapt_x=adapt_x,
                        online=online,
                    ),
                    lr=lr,
                    n_adapt=n,
                )
        if "cama_ft" in methods:
            measure_cama_ft(s, prefix, n, adapt_x, score)


GATED = re.compile(r"\.(gate_accepted|cama_ft|clean_after_ft)\.n\d+$")  # what the gate decides
EVIDENCE = "evidence=1"  # what a job's cached gate evidence holds; bumped when that changes


def measure_cama_ft(s: Setup, prefix: str, n: int, adapt_x: np.ndarray, score: Split) -> None:
    """One job through the service's code path: the adapted model's scores (``cama_adapted``, and
    ``clean_adapted`` on the clean scoring half) and the gate's evidence before and after, cached
    by recipe; then the gate's verdict (:func:`judge`), which only the evidence feeds, so a new
    gate is judged on cached jobs without adapting again."""
    c, recipe = s.cache, recipe_id(s.recipe)
    names = ("cama_adapted", "clean_adapted", "adapt_seconds", "gate_evidence")
    keys = {name: f"{prefix}.{name}.n{n}" for name in names}
    tags = {**dict.fromkeys(keys, recipe), "gate_evidence": f"{recipe};{EVIDENCE}"}
    if not all(c.fresh(keys[k], s.digest, tags[k]) for k in names):
        t0 = time.perf_counter()
        model, outcome = adapt_like_the_service(s, adapt_x)
        seconds = time.perf_counter() - t0
        info: dict[str, Any] = {"model": s.digest, "n_adapt": n}
        print(f"  {prefix} n={n}: adapted in {seconds:.0f}s", flush=True)
        if not c.fresh(keys["adapt_seconds"], s.digest, recipe):  # the job's time, gate included
            c.put(
                keys["adapt_seconds"],
                {"value": seconds, **info, "recipe": recipe, "steps": outcome.report.steps},
            )
        evidence = {"before": outcome.decision.before.as_dict(), "after": outcome.decision.after.as_dict()}
        c.put(
            keys["gate_evidence"],
            {
                "value": outcome.heldout_inputs,
                **info,
                "recipe": tags["gate_evidence"],
                "seconds": seconds,
                **evidence,
            },
        )
        c.get(keys["cama_adapted"], partial(served_accuracy, model, score.x, score.y), recipe=recipe, **info)
        c.get(
            keys["clean_adapted"],
            partial(served_accuracy, model, s.clean_score.x, s.clean_score.y),
            recipe=recipe,
            **info,
        )
    c.get(f"{prefix}.cama", partial(served_accuracy, s.cama, score.x, score.y), model=s.digest)
    judge(s, prefix, n)


def judge(s: Setup, prefix: str, n: int) -> None:
    """The gate's verdict on a cached job (:func:`cama.adapt.promotion_gate` on its evidence) and
    what it serves: the adapted model if accepted, else the unadapted one (``cama_ft``,
    ``clean_after_ft``)."""
    c, recipe = s.cache, f"{recipe_id(s.recipe)};gate:{gate_id(s.gate)}"
    evidence = c.data[f"{prefix}.gate_evidence.n{n}"]
    decision = promotion_gate(
        GateEvaluation.from_dict(evidence["before"]), GateEvaluation.from_dict(evidence["after"]), s.gate
    )
    info: dict[str, Any] = {"model": s.digest, "recipe": recipe, "n_adapt": n}
    c.put(
        f"{prefix}.gate_accepted.n{n}",
        {"value": float(decision.accepted), **info, "gate": decision.as_dict()},
    )
    # a refused job leaves the served model in place: its scores are the unadapted model's, the
    # same numbers (same model, images and noise seed) as `cama` and `clean.cama`
    unadapted = c.data[f"{prefix}.cama"]["value"]
    clean = c.get(
        f"{s.prefix}.clean.cama",
        partial(served_accuracy, s.cama, s.clean_score.x, s.clean_score.y),
        model=s.digest,
    )
    chosen = {
        "cama_ft": c.data[f"{prefix}.cama_adapted.n{n}"]["value"] if decision.accepted else unadapted,
        "clean_after_ft": c.data[f"{prefix}.clean_adapted.n{n}"]["value"] if decision.accepted else clean,
    }
    for name, value in chosen.items():
        key, entry = f"{prefix}.{name}.n{n}", {"value": value, **info}
        if c.data.get(key) != entry:  # a figure the cache already holds is not shown again
            c.put(key, entry, show=name == "cama_ft")
    verdict = "accepts" if decision.accepted else f"REFUSES {list(decision.refused_by)}"
    print(f"  {prefix} n={n}: the gate {verdict}", flush=True)


def every_corruption(s: Setup, data: dict[str, float], pattern: str) -> list[float] | None:
    """``data[pattern.format(c)]`` for every set of the suite, or None if one is missing."""
    values = [data.get(pattern.format(c)) for c in s.names]
    return None if any(v is None for v in values) else [float(v) for v in values if v is not None]


def outputs(s: Setup) -> dict[str, float]:
    """Means over the suite's sets, summary keys, the table and the plot."""
    p = s.prefix
    # the figures a gate decides are reported only for the gate of this run: a job judged by
    # another gate (no cached evidence to judge it again) is left out, never mixed in
    judged = f"{recipe_id(s.recipe)};gate:{gate_id(s.gate)}"
    stale = [
        k
        for k, v in s.cache.data.items()
        if k.startswith(f"{p}.") and GATED.search(k) and v.get("recipe") != judged
    ]
    data = {k: float(v["value"]) for k, v in s.cache.data.items() if k.startswith(f"{p}.") and k not in stale}
    metrics = {
        k: v for k, v in data.items() if not k.startswith("mnistc.tent_lr.") and ".gate_evidence." not in k
    }
    for n in s.ns:
        for method in METHODS:
            values = every_corruption(s, data, f"{p}.{{}}.{method}.n{n}")
            if values is not None:
                metrics[f"{p}.mean.{method}.n{n}"] = float(np.mean(values))
        accepted = every_corruption(s, data, f"{p}.{{}}.gate_accepted.n{n}")
        if accepted is not None:
            metrics[f"{p}.gate_accepted.n{n}"] = float(np.sum(accepted))
        clean = every_corruption(s, data, f"{p}.{{}}.clean_after_ft.n{n}")
        if clean is not None:
            metrics[f"{p}.clean_after_ft.min.n{n}"] = min(clean)
        seconds = every_corruption(s, data, f"{p}.{{}}.adapt_seconds.n{n}")
        if seconds is not None:
            metrics[f"{p}.adapt_seconds.median.n{n}"] = float(np.median(seconds))
    metrics |= gate_confusion(s)
    metrics[f"{p}.clean.cama"] = s.cache.get(
        f"{p}.clean.cama", partial(served_accuracy, s.cama, s.clean_score.x, s.clean_score.y), model=s.digest
    )
    out = Path(s.args.out_dir)
    if p == "mnistc":
        summaries = [
            f"{p}.{what}.n{n}"
            for n in s.ns
            for what in ("mean.cama_ft", "gate_accepted", "clean_after_ft.min")
        ]
        update_metrics(
            metrics, out / "metrics.json", drop=tuple(k for k in [*stale, *summaries] if k not in metrics)
        )
    atomic_write(out / f"{p}.md", table(metrics, s) + "\n")
    plot(metrics, s, out / f"{p}.png")
    return metrics


def measuring_args(argv: list[str]) -> list[str]:
    """``argv`` without the options that only rewrite outputs (``--sections``, ``--force`` and
    ``--merge`` with its caches): the command that measures what the outputs show."""
    out: list[str] = []
    skipping = False
    for arg in argv:
        if arg.startswith("--"):
            skipping = arg == "--merge"
            if skipping or arg in ("--sections", "--force"):
                continue
        if not skipping:
            out.append(arg)
    return out


def table(m: dict[str, float], s: Setup) -> str:
    """The suite's table: one row per set, one column per method, at each n."""
    p = s.prefix
    what = (
        "each corruption of MNIST-C's test set"
        if p == "mnistc"
        else "each named manipulation (`training.manipulations`) of the validation split of MNIST's"
        " training set"
    )
    command = " ".join(["python -m experiments.evaluate_mnistc", *measuring_args(sys.argv[1:])])
    lines = [
        "# MNIST-C" if p == "mnistc" else "# MNIST-C protocol on validation manipulations",
        "",
        f"Accuracy on the scoring half of {what}; adaptation on the first",
        "n unlabelled images of the other half. Written by",
        f"`{command}`; the protocol is in",
        "that module's docstring. CAMA is the served checkpoint, answered as `POST /predict` answers;",
        f"`cama_ft` is `POST /adapt`'s code path with the recipe `{recipe_id(s.recipe)}`.",
        "",
    ]
    for n in s.ns:
        cols = [c for c in METHODS if any(f"{p}.{name}.{c}.n{n}" in m for name in s.names)]
        if not cols:
            continue
        lines += [f"## n = {n}", "", "| set | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        for corruption in s.names:
            cells = [m.get(f"{p}.{corruption}.{c}.n{n}") for c in cols]
            if all(v is None for v in cells):
                continue
            lines.append(
                f"| {corruption} | " + " | ".join("" if v is None else f"{v:.3f}" for v in cells) + " |"
            )
        means = [m.get(f"{p}.mean.{c}.n{n}") for c in cols]
        lines.append("| **mean** | " + " | ".join("" if v is None else f"**{v:.3f}**" for v in means) + " |")
        if f"{p}.gate_accepted.n{n}" in m:
            accepted = int(m[f"{p}.gate_accepted.n{n}"])
            lines.append(f"\nThe gate accepted {accepted} of {len(s.names)} adaptations.")
        poisoned = m.get(f"{p}.{POISONED}.gate_accepted.n{n}")
        if poisoned is not None:
            lines.append(f"\nA batch of uniform noise: {'ACCEPTED' if poisoned else 'refused'} by the gate.")
        lines.append("")
    lines += gate_table(s)
    lines += ["Published means over the 15 corruptions, for orientation (other protocols):", ""]
    lines += [f"- {name}: {value:.3f}" for name, value in PUBLISHED.items()]
    return "\n".join(lines)


LOST = 0.005  # a job that moves accuracy by more than this lost or gained; within it, held


def verdict(s: Setup, name: str, n: int) -> dict[str, Any] | None:
    """The cached ``gate_accepted`` entry of the job on ``name`` at ``n`` if this run's gate
    judged it, else None."""
    entry = s.cache.data.get(f"{s.prefix}.{name}.gate_accepted.n{n}")
    judged = f"{recipe_id(s.recipe)};gate:{gate_id(s.gate)}"
    return entry if entry is not None and entry.get("recipe") == judged else None


def job_outcome(s: Setup, name: str, n: int) -> str | None:
    """Whether the job on set ``name`` at ``n`` lost, held or gained accuracy on its scoring half
    (``cama_adapted`` against ``cama``, by :data:`LOST`), or None if it is not measured."""
    data = s.cache.data
    adapted, base = data.get(f"{s.prefix}.{name}.cama_adapted.n{n}"), data.get(f"{s.prefix}.{name}.cama")
    if adapted is None or base is None or verdict(s, name, n) is None:
        return None
    delta = float(adapted["value"]) - float(base["value"])
    return "lost" if delta < -LOST else "gained" if delta > LOST else "held"


def gate_confusion(s: Setup) -> dict[str, float]:
    """``<prefix>.gate.<lost|held|gained>_<kept|refused>.n<N>``: how many jobs of each outcome the
    gate kept and refused (the poisoned batch excluded)."""
    out: dict[str, float] = {}
    for n in s.ns:
        for name in s.names:
            outcome = job_outcome(s, name, n)
            if outcome is None:
                continue
            for o in ("lost", "held", "gained"):
                for verdict in ("kept", "refused"):
                    out.setdefault(f"{s.prefix}.gate.{o}_{verdict}.n{n}", 0.0)
            kept = s.cache.data[f"{s.prefix}.{name}.gate_accepted.n{n}"]["value"] == 1.0  # judged
            key = f"{s.prefix}.gate.{outcome}_{'kept' if kept else 'refused'}.n{n}"
            out[key] = out.get(key, 0.0) + 1.0
    return out


def gate_table(s: Setup) -> list[str]:
    """The gate's verdict on every measured job with its per-input evidence, and the confusion of
    verdicts against what each job did to accuracy (which the gate never sees)."""
    p, data = s.prefix, s.cache.data
    lines = [
        "## The promotion gate's verdicts",
        "",
        f"The gate `{gate_id(s.gate)}` (`cama.adapt.GateConfig`) on each job's held-out fifth,",
        "judged from the cached evidence; accuracy on the scoring half, which the gate never sees.",
        "changed: share of held-out labels that change; explained: share of those whose ELBO(x) gain",
        "is above the held-out median's; agreement: share of the base's confident labels kept;",
        "class fall: the largest fall of one class's share of the predictions.",
        "",
        "| set | n | unadapted | adapted | change | changed | explained | agreement | class fall | gate |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    confusion = gate_confusion(s)
    for n in s.ns:
        for name in s.sets:
            entry = verdict(s, name, n)
            if entry is None or f"{p}.{name}.cama_adapted.n{n}" not in data:
                continue
            gate = entry["gate"]
            base, adapted = data[f"{p}.{name}.cama"]["value"], data[f"{p}.{name}.cama_adapted.n{n}"]["value"]
            said = "kept" if gate["accepted"] else "refused: " + ", ".join(gate.get("refused_by", []))
            lines.append(
                f"| {name} | {n} | {base:.3f} | {adapted:.3f} | {100 * (adapted - base):+.1f} |"
                f" {gate['heldout_changed_share']:.3f} | {gate['heldout_explained_share']:.3f} |"
                f" {gate['heldout_confident_agreement']:.3f} | {gate['heldout_class_share_fall']:.3f} |"
                f" {said} |"
            )
    lines += ["", "| n | outcome (by 0.5 point) | kept | refused |", "|---:|---|---:|---:|"]
    for n in s.ns:
        for outcome in ("lost", "held", "gained"):
            kept = confusion.get(f"{p}.gate.{outcome}_kept.n{n}", 0.0)
            refused = confusion.get(f"{p}.gate.{outcome}_refused.n{n}", 0.0)
            if kept or refused:
                lines.append(f"| {n} | {outcome} | {kept:.0f} | {refused:.0f} |")
    return [*lines, ""]


BAR_METHODS = ("dnn", "tent_flat", "tent_flat_online", "tent_gap_online", "cama", "cama_ft")


def plot(m: dict[str, float], s: Setup, path: Path) -> None:
    """Mean accuracy over the sets against n, one line per method; with one n, per-set bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [n for n in s.ns if any(f"{s.prefix}.{name}.cama_ft.n{n}" in m for name in s.names)]
    if len(measured) == 1:
        n = measured[0]

        def value(name: str, method: str) -> float:
            return m.get(f"{s.prefix}.{name}.{method}.n{n}", m.get(f"{s.prefix}.{name}.{method}", np.nan))

        names = [*s.names, "mean"]
        width = 0.8 / len(BAR_METHODS)
        fig, ax = plt.subplots(figsize=(12, 4))
        for i, method in enumerate(BAR_METHODS):
            xs = np.arange(len(names)) + (i - len(BAR_METHODS) / 2 + 0.5) * width
            ax.bar(xs, [value(name, method) for name in names], width, label=method)
        ax.set_xticks(np.arange(len(names)), names, rotation=40, ha="right", fontsize=8)
        ax.set_ylabel(f"accuracy (adapted on n = {n})")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, ncol=len(BAR_METHODS), loc="lower center", bbox_to_anchor=(0.5, 1.0))
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    colours = plt.get_cmap("tab20")  # one colour per method (pairs of shades), 20 of them
    for i, method in enumerate(METHODS):
        ns = [n for n in s.ns if f"{s.prefix}.mean.{method}.n{n}" in m]
        if ns:
            values = [m[f"{s.prefix}.mean.{method}.n{n}"] for n in ns]
            style = "-" if method.startswith("cama") else "--"
            ax.plot(ns, values, style, marker="o", color=colours(i % 20), label=method)
    ax.set_xscale("log")
    ax.set_xlabel("unlabelled images adapted on (n)")
    ax.set_ylabel(f"mean accuracy over the {len(s.names)} sets")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_data_dir_argument(parser)
    parser.add_argument("--checkpoint", default="models/mnist_cama.pt", help="the served CAMA")
    parser.add_argument("--serving-data", default="models/mnist_serving_data.npz")
    parser.add_argument("--dnn", default="models/mnist_dnn.pt")
    parser.add_argument("--dnn-generic", dest="dnn_generic", default="models/mnist_dnn_generic.pt")
    parser.add_argument("--bncnn-gap", dest="bncnn_gap", default="models/mnist_bncnn.pt")
    parser.add_argument("--bncnn-flat", dest="bncnn_flat", default="models/mnist_bncnn_flat.pt")
    parser.add_argument(
        "--suite",
        choices=["mnistc", "validation"],
        default="mnistc",
        help="validation: the same protocol on training.manipulations' named manipulations of the"
        " validation split (where the recipe and the gate are chosen); never MNIST-C",
    )
    parser.add_argument("--corruptions", nargs="*", default=None, help="the sets to measure (default all)")
    parser.add_argument(
        "--recipe", type=json.loads, default={}, help="recipe overrides (JSON) over the checkpoint's own"
    )
    parser.add_argument("--ns", nargs="+", type=int, default=list(NS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--sections", action="store_true", help="measure nothing; rewrite the outputs")
    parser.add_argument("--score-limit", type=int, default=None, help="score on the first N of each half")
    parser.add_argument(
        "--validation-limit", type=int, default=None, help="TENT's step size on the first N validation images"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--force", action="store_true", help="ignore the cache")
    parser.add_argument(
        "--merge",
        nargs="+",
        default=[],
        metavar="CACHE",
        help="first take the figures of other runs' caches (parallel processes over disjoint sets)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cama, meta = load_checkpoint(args.checkpoint, map_location=device)
    if not isinstance(cama, ImageCama):
        raise SystemExit(f"{args.checkpoint} is not an image CAMA checkpoint")
    mnist = load_mnist(args.data_dir)
    _, val = validation_split(mnist.train, 0.05, 0)
    if args.suite == "mnistc":
        prefix, labels, clean = "mnistc", mnist.test.y, mnist.test
        mnistc = load_mnist_c(args.data_dir)
        sets = {c: mnistc.images[c] for c in MNISTC_CORRUPTIONS}
    else:
        prefix, labels, clean = "mnistc_val", val.y, val
        rng = np.random.default_rng(1)
        sets = {f"{name}_{level:g}": named(name, level)(val.x, rng) for name, level in TENT_VALIDATION}
        sets |= {f"{name}_{level:g}": named(name, level)(val.x, rng) for name, level in GATE_VALIDATION}
        sets[POISONED] = np.random.default_rng(2).random(val.x.shape).astype(np.float32)
    unknown = set(args.corruptions or ()) - set(sets)
    if unknown:
        parser.error(f"unknown sets {sorted(unknown)}; known: {sorted(sets)}")
    _, clean_idx = halves(clean)
    cache = Cache(Path(args.out_dir) / f"{prefix}_eval.json", args.force)
    cache.context = {"device": args.device}
    if args.score_limit is not None:
        cache.context["n_score"] = args.score_limit
    s = Setup(
        args=args,
        prefix=prefix,
        sets=sets,
        labels=labels,
        clean_score=Split(clean.x[clean_idx][: args.score_limit], clean.y[clean_idx][: args.score_limit]),
        validation=Split(val.x[: args.validation_limit], val.y[: args.validation_limit]),
        cama=cama.eval(),
        digest=sha256_file(args.checkpoint)[:12],
        recipe=FinetuneConfig.from_dict(
            args.recipe, base=FinetuneConfig.from_dict(meta.provenance.get("adapt_recipe") or {})
        ),
        gate=GateConfig(),
        serving=ServingData.load(args.serving_data),
        cache=cache,
        device=device,
        baselines={},
    )
    for path in args.merge:
        taken = cache.merge(json.loads(Path(path).read_text()), s.digest)
        print(f"merged {taken} figures from {path}", flush=True)
    stale = cache.forget_other(s.digest, keep=lambda key: False)
    if stale:
        print(f"dropped {len(stale)} figures measured on another checkpoint", flush=True)
    if not args.sections:
        for corruption in args.corruptions or list(s.sets):
            measure(s, corruption)
    for corruption in s.sets:  # the gate's verdict on every cached job, under today's gate
        for n in s.ns:
            if s.cache.fresh(
                f"{prefix}.{corruption}.gate_evidence.n{n}", s.digest, f"{recipe_id(s.recipe)};{EVIDENCE}"
            ):
                judge(s, f"{prefix}.{corruption}", n)
    metrics = outputs(s)
    for n in s.ns:
        row = {m: metrics.get(f"{prefix}.mean.{m}.n{n}") for m in METHODS}
        if any(v is not None for v in row.values()):
            print(f"n={n}: " + "  ".join(f"{m} {v:.3f}" for m, v in row.items() if v is not None))


if __name__ == "__main__":
    main()

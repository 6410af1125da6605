"""MNIST-C (Mu & Gilmer 2019) as a test of corruptions no model here was trained or tuned on.

    python -m training.evaluate_mnistc                         # every corruption, n = 100, 500, 2000
    python -m training.evaluate_mnistc --corruptions fog stripe --ns 500
    python -m training.evaluate_mnistc --sections              # only rewrite table, plot and metrics

Protocol, per corruption: the 10,000 corrupted test images are split into an adapt half and a
scoring half (the seeded split of every MNIST figure, ``training.experiment.halves``); each method
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
  the unadapted model.

Also ``mnistc.clean_after_ft.min.n500`` (the lowest clean accuracy, on the clean scoring half,
after any of the 15 adaptations on 500 images), ``mnistc.adapt_seconds.median.n500`` (wall time of
one adaptation job, gate included) and ``mnistc.gate_accepted.n<N>`` (accepted jobs). Figures are
cached in ``docs/results/mnistc_eval.json`` (``training.eval_cache``); the table goes to
``docs/results/mnistc.md``, the plot to ``docs/results/mnistc.png``, the keys to ``metrics.json``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.data import ServingData
from cama.adapt import AdaptOutcome, FinetuneConfig, GateConfig, Labelled, adapt_batch
from cama.checkpoint import load_checkpoint, sha256_file
from cama.image_model import ImageCama
from cama.objectives import SCREEN_MARGIN, bayes_predict
from training.baselines import evaluate_accuracy, load_baseline
from training.data import MNISTC_CORRUPTIONS, MnistC, Split, load_mnist, load_mnist_c, validation_split
from training.eval_cache import Cache, MissingModelError, recipe_id
from training.experiment import halves, resolve_device
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
    "cama_ft",
)
PUBLISHED = {"CNN (Mu & Gilmer 2019)": 0.759, "test-time Hopfield layer (Sargolzaei & Rueda 2024)": 0.898}


@dataclass
class Setup:
    """The data, the models and the cache of one run."""

    args: argparse.Namespace
    mnistc: MnistC
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

    def halves(self, corruption: str) -> tuple[Split, Split]:
        """(adapt half, scoring half) of one corruption."""
        adapt_idx, score_idx = halves(Split(self.mnistc.images[corruption], self.mnistc.y))
        x, y = self.mnistc.images[corruption], self.mnistc.y
        n = self.args.score_limit
        return Split(x[adapt_idx], y[adapt_idx]), Split(x[score_idx][:n], y[score_idx][:n])


def served_accuracy(model: ImageCama, split: Split, *, k: int = 10, seed: int = 0) -> float:
    """Accuracy of eq. 6 as ``POST /predict`` computes it: K samples behind the first-sample screen."""
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    pred = bayes_predict(
        model, torch.from_numpy(split.x).to(device), k=k, generator=gen, screen=SCREEN_MARGIN
    )
    return float((pred.labels.cpu().numpy() == split.y).mean())


def adapt_like_the_service(s: Setup, adapt_x: np.ndarray) -> tuple[ImageCama, AdaptOutcome]:
    """A copy of the served CAMA after ``POST /adapt``'s code path on ``adapt_x`` (unlabelled)."""
    model = copy.deepcopy(s.cama)
    data = s.serving
    outcome = adapt_batch(
        model,
        torch.from_numpy(adapt_x).to(s.device),
        s.recipe,
        s.gate,
        replay=Labelled(*(torch.from_numpy(a).to(s.device) for a in (data.replay.x, data.replay_y))),
        canary=Labelled(*(torch.from_numpy(a).to(s.device) for a in (data.canary.x, data.canary_y))),
    )
    return model.eval(), outcome


def tent_lr(s: Setup, arch: str) -> float:
    """TENT's step size for ``arch``: the best mean accuracy over ``TENT_VALIDATION`` on the
    validation split (adapt on its first 500 images, score the rest with the parameters frozen)."""
    key = f"mnistc.tent_lr.{arch}"

    def choose() -> float:
        val = s.validation
        rng = np.random.default_rng(0)
        sets = [named(name, level)(val.x, rng) for name, level in TENT_VALIDATION]
        means = {}
        for lr in TENT_LRS:
            accs = [
                tent_accuracy(
                    s.baseline(arch), x[500:], val.y[500:], TENT_BATCH, lr=lr, adapt_x=x[:500], online=False
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
    prefix = f"mnistc.{corruption}"
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
        value = c.get(f"{prefix}.cama", partial(served_accuracy, s.cama, score), model=s.digest)
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


def measure_cama_ft(s: Setup, prefix: str, n: int, adapt_x: np.ndarray, score: Split) -> None:
    """``cama_ft`` (and, at n = 500, clean accuracy after it) through the service's code path."""
    c, recipe = s.cache, recipe_id(s.recipe)
    keys = [f"{prefix}.cama_ft.n{n}", f"{prefix}.clean_after_ft.n{n}", f"{prefix}.adapt_seconds.n{n}"]
    if all(c.fresh(k, s.digest, recipe) for k in keys):
        return
    t0 = time.perf_counter()
    model, outcome = adapt_like_the_service(s, adapt_x)
    seconds = time.perf_counter() - t0
    info: dict[str, Any] = {"model": s.digest, "recipe": recipe, "n_adapt": n}
    accepted = outcome.accepted
    reasons = list(outcome.decision.reasons)
    print(
        f"  {prefix} n={n}: {seconds:.0f}s, gate {'accepts' if accepted else 'REFUSES'} {reasons}", flush=True
    )
    c.put(keys[2], {"value": seconds, **info, "steps": outcome.report.steps})
    c.put(f"{prefix}.gate_accepted.n{n}", {"value": float(accepted), **info, "reasons": reasons})
    # a refused job leaves the served model in place (adapt_batch undid it): both scores are its own
    c.get(keys[0], partial(served_accuracy, model, score), model=s.digest, recipe=recipe, n_adapt=n)
    c.get(keys[1], partial(served_accuracy, model, s.clean_score), model=s.digest, recipe=recipe, n_adapt=n)


def every_corruption(data: dict[str, float], pattern: str) -> list[float] | None:
    """``data[pattern.format(c)]`` for the 15 corruptions, or None if one is missing."""
    values = [data.get(pattern.format(c)) for c in MNISTC_CORRUPTIONS]
    return None if any(v is None for v in values) else [float(v) for v in values if v is not None]


def outputs(s: Setup) -> dict[str, float]:
    """Means over corruptions, summary keys, the table and the plot."""
    data = {k: float(v["value"]) for k, v in s.cache.data.items() if k.startswith("mnistc.")}
    metrics = {k: v for k, v in data.items() if not k.startswith("mnistc.tent_lr.")}
    for n in NS:
        for method in METHODS:
            values = every_corruption(data, "mnistc.{}." + f"{method}.n{n}")
            if values is not None:
                metrics[f"mnistc.mean.{method}.n{n}"] = float(np.mean(values))
        accepted = every_corruption(data, "mnistc.{}." + f"gate_accepted.n{n}")
        if accepted is not None:
            metrics[f"mnistc.gate_accepted.n{n}"] = float(np.sum(accepted))
    clean = every_corruption(data, "mnistc.{}.clean_after_ft.n500")
    if clean is not None:
        metrics["mnistc.clean_after_ft.min.n500"] = min(clean)
    seconds = every_corruption(data, "mnistc.{}.adapt_seconds.n500")
    if seconds is not None:
        metrics["mnistc.adapt_seconds.median.n500"] = float(np.median(seconds))
    metrics["mnistc.clean.cama"] = s.cache.get(
        "mnistc.clean.cama", partial(served_accuracy, s.cama, s.clean_score), model=s.digest
    )
    out = Path(s.args.out_dir)
    update_metrics(metrics, out / "metrics.json")
    (out / "mnistc.md").write_text(table(metrics, s) + "\n")
    plot(metrics, out / "mnistc.png")
    return metrics


def table(m: dict[str, float], s: Setup) -> str:
    """The MNIST-C table: one row per corruption, one column per method, at each n."""
    lines = [
        "# MNIST-C",
        "",
        "Accuracy on the scoring half of each corruption of MNIST-C's test set; adaptation on the first",
        "n unlabelled images of the other half. Written by",
        f"`{' '.join(['python -m training.evaluate_mnistc', *sys.argv[1:]])}`; the protocol is in",
        "that module's docstring. CAMA is the served checkpoint, answered as `POST /predict` answers;",
        f"`cama_ft` is `POST /adapt`'s code path with the recipe `{recipe_id(s.recipe)}`.",
        "",
    ]
    for n in NS:
        cols = [c for c in METHODS if f"mnistc.mean.{c}.n{n}" in m]
        if not cols:
            continue
        lines += [
            f"## n = {n}",
            "",
            "| corruption | " + " | ".join(cols) + " |",
            "|---|" + "---:|" * len(cols),
        ]
        for corruption in MNISTC_CORRUPTIONS:
            cells = [m.get(f"mnistc.{corruption}.{c}.n{n}") for c in cols]
            lines.append(
                f"| {corruption} | " + " | ".join("" if v is None else f"{v:.3f}" for v in cells) + " |"
            )
        lines.append(
            "| **mean** | " + " | ".join(f"**{m[f'mnistc.mean.{c}.n{n}']:.3f}**" for c in cols) + " |"
        )
        if f"mnistc.gate_accepted.n{n}" in m:
            lines.append(f"\nThe gate accepted {int(m[f'mnistc.gate_accepted.n{n}'])} of 15 adaptations.")
        lines.append("")
    lines += ["Published means over the 15 corruptions, for orientation (other protocols):", ""]
    lines += [f"- {name}: {value:.3f}" for name, value in PUBLISHED.items()]
    return "\n".join(lines)


def plot(m: dict[str, float], path: Path) -> None:
    """Mean accuracy over the 15 corruptions against n, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        ns = [n for n in NS if f"mnistc.mean.{method}.n{n}" in m]
        if ns:
            ax.plot(ns, [m[f"mnistc.mean.{method}.n{n}"] for n in ns], marker="o", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("unlabelled images adapted on (n)")
    ax.set_ylabel("mean accuracy over MNIST-C's 15 corruptions")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--checkpoint", default="models/mnist_cama.pt", help="the served CAMA")
    parser.add_argument("--serving-data", default="models/mnist_serving_data.npz")
    parser.add_argument("--dnn", default="models/mnist_dnn.pt")
    parser.add_argument("--dnn-generic", dest="dnn_generic", default="models/mnist_dnn_generic.pt")
    parser.add_argument("--bncnn-gap", dest="bncnn_gap", default="models/mnist_bncnn.pt")
    parser.add_argument("--bncnn-flat", dest="bncnn_flat", default="models/mnist_bncnn_flat.pt")
    parser.add_argument(
        "--corruptions", nargs="*", choices=MNISTC_CORRUPTIONS, default=list(MNISTC_CORRUPTIONS)
    )
    parser.add_argument("--ns", nargs="+", type=int, default=list(NS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--sections", action="store_true", help="measure nothing; rewrite the outputs")
    parser.add_argument("--score-limit", type=int, default=None, help="score on the first N of each half")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--force", action="store_true", help="ignore the cache")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cama, meta = load_checkpoint(args.checkpoint, map_location=device)
    if not isinstance(cama, ImageCama):
        raise SystemExit(f"{args.checkpoint} is not an image CAMA checkpoint")
    mnist = load_mnist(args.data_dir)
    _, score_idx = halves(mnist.test)
    _, val = validation_split(mnist.train, 0.05, 0)
    cache = Cache(Path(args.out_dir) / "mnistc_eval.json", args.force)
    cache.context = {"device": args.device}
    if args.score_limit is not None:
        cache.context["n_score"] = args.score_limit
    s = Setup(
        args=args,
        mnistc=load_mnist_c(args.data_dir),
        clean_score=Split(
            mnist.test.x[score_idx][: args.score_limit], mnist.test.y[score_idx][: args.score_limit]
        ),
        validation=val,
        cama=cama.eval(),
        digest=sha256_file(args.checkpoint)[:12],
        recipe=FinetuneConfig.from_dict(meta.provenance.get("adapt_recipe") or {}),
        gate=GateConfig(),
        serving=ServingData.load(args.serving_data),
        cache=cache,
        device=device,
        baselines={},
    )
    stale = cache.forget_other(s.digest, keep=lambda key: False)
    if stale:
        print(f"dropped {len(stale)} figures measured on another checkpoint", flush=True)
    if not args.sections:
        for corruption in args.corruptions:
            measure(s, corruption)
    metrics = outputs(s)
    for n in NS:
        row = {m: metrics.get(f"mnistc.mean.{m}.n{n}") for m in METHODS}
        if any(v is not None for v in row.values()):
            print(f"n={n}: " + "  ".join(f"{m} {v:.3f}" for m, v in row.items() if v is not None))


if __name__ == "__main__":
    main()

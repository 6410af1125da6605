"""How well the served model notices a manipulation: the unusual score and the drift test.

    python -m benchmarks.drift                       # MNIST-C against clean MNIST test images
    python -m benchmarks.drift --suite validation    # training.manipulations on the validation split

Every score comes from the path ``POST /predict`` serves (ONNX Runtime, the first-sample screen,
the service's default K), calibrated as the service calibrates it: ``log p(x)`` of the first
``--evidence-inputs`` canary images of ``models/mnist_serving_data.npz`` (:mod:`cama.novelty`).

- ``drift.auroc.<set>``: the unusual score separating each set from clean images (1: perfectly,
  0.5: not at all), and ``drift.auroc.mean``;
- ``drift.false_alarms_per_10k``: alarms of the drift test (:mod:`cama.drift`, the service's
  default window and thresholds) on ``--clean-streams`` shuffled streams of the clean images, one
  image per request, per 10,000 requests;
- ``drift.detect.requests_to_alarm.<set>``: a stream of clean images that switches to the set;
  requests after the switch until the alarm (``--horizon`` + 1 when none by then), and the median
  over the sets ``drift.detect.requests_to_alarm.median``.

The MNIST-C suite uses ``--n`` images of each corruption (a fixed random draw, the same indices for
every corruption) and the 10,000 clean test images; the validation suite uses images of the 5%
validation split of MNIST's training set that are not in the canary, and is the one to choose the
score and the test's settings on: it also compares the class Gaussian's ridges (``CLASS_RIDGES``).
Writes ``benchmarks/results/drift[_val].json`` and, for MNIST-C, the keys above in
``docs/results/metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.core.config import Settings
from app.serving import EvidenceSettings, LoadedVersion, load_version
from benchmarks.live_adapt import corruption_sets, live_adaptation, routing
from cama.drift import DriftConfig, DriftDetector
from cama.novelty import CLASS_RIDGE, RULES, MGaussian, Rule, log_evidence, share_below
from experiments.evaluate_mnistc import TENT_VALIDATION
from harness.stores import mnist_store
from store.data import Inputs, ServingData
from training.data import MNISTC_CORRUPTIONS, load_mnist, load_mnist_c, validation_split
from training.manipulations import named
from training.metrics import update_metrics

RESULTS = Path("benchmarks/results")
CLASS_RIDGES = (0.01, 0.03, 0.1, 0.3, 1.0)  # the class Gaussian's ridges the validation suite compares
SECTIONS = ("scores", "auto_adapt", "routing")
BATCH = 100


def evidence_and_features(
    version: LoadedVersion, x: np.ndarray, k: int, screen: float | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``log p(x)`` and q(m|x)'s summary of every image, as ``POST /predict`` computes them
    (batches of ``BATCH``)."""
    log_px, features = [], []
    for start in range(0, len(x), BATCH):
        inputs = Inputs(np.ascontiguousarray(x[start : start + BATCH], dtype=np.float32))
        noise = version.noise(len(inputs), k, seed + start)
        log_px.append(log_evidence(version.log_weights(inputs, noise, "onnx", screen=screen)))
        features.append(version.m_features(inputs))
    return np.concatenate(log_px), np.concatenate(features)


def unusual_scores(
    version: LoadedVersion, x: np.ndarray, k: int, screen: float | None, seed: int
) -> tuple[dict[Rule, np.ndarray], np.ndarray]:
    """The unusual score of every image by each rule of :mod:`cama.novelty`, from what
    ``POST /predict`` computes, and the images' q(m|x) summaries."""
    assert version.evidence is not None
    lp, f = evidence_and_features(version, x, k, screen, seed)
    return {rule: version.evidence.unusual(lp, f, rule) for rule in RULES}, f


def class_ridge_sweep(
    version: LoadedVersion,
    serving: ServingData,
    n: int,
    clean: np.ndarray,
    shifted: dict[str, np.ndarray],
) -> dict[str, float]:
    """Mean AUROC of the ``m_class`` rule for each ridge in ``CLASS_RIDGES``: the class Gaussian
    refitted on the canary's second ``n`` inputs, ranked on its first ``n`` (as the service does);
    ``clean`` and ``shifted`` are q(m|x) summaries."""
    canary = version.m_features(serving.canary.take(slice(0, n)))
    fit = version.m_features(serving.canary.take(slice(n, 2 * n)))
    labels = serving.canary_y[n : 2 * n]
    out: dict[str, float] = {}
    for ridge in CLASS_RIDGES:
        model = MGaussian.fit(fit, labels, ridge)
        reference = np.sort(model.distance(canary))
        clean_u = share_below(reference, model.distance(clean))
        out[f"{ridge:g}"] = float(
            np.mean([auroc(clean_u, share_below(reference, model.distance(f))) for f in shifted.values()])
        )
        print(f"m_class ridge {ridge:g}: mean AUROC {out[f'{ridge:g}']:.4f}", flush=True)
    return out


def auroc(clean: np.ndarray, shifted: np.ndarray) -> float:
    """P(a shifted score > a clean one) + half the ties (the Mann-Whitney U statistic, normalised)."""
    both = np.concatenate([clean, shifted])
    order = both.argsort(kind="stable")
    ranks = np.empty(len(both))
    ranks[order] = np.arange(1, len(both) + 1)
    for value in np.unique(both):  # mid-ranks for ties
        tied = both == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    u = ranks[len(clean) :].sum() - len(shifted) * (len(shifted) + 1) / 2
    return float(u / (len(clean) * len(shifted)))


def alarms_on(scores: np.ndarray, config: DriftConfig) -> int:
    detector = DriftDetector(config)
    for s in scores:
        detector.update([s])
    return detector.alarms


def requests_to_alarm(clean: np.ndarray, shifted: np.ndarray, config: DriftConfig, horizon: int) -> int:
    """A warmed-up test on clean images, then the shifted stream: inputs until the alarm."""
    detector = DriftDetector(config)
    detector.update(clean[: config.window])
    for i, s in enumerate(shifted[:horizon]):
        if detector.update([s]) == "drift":
            return i + 1
    return horizon + 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = Settings()
    parser.add_argument("--suite", choices=("mnistc", "validation"), default="mnistc")
    parser.add_argument("--checkpoint", type=Path, default=Path("models/mnist_cama.pt"))
    parser.add_argument("--serving-data", type=Path, default=Path("models/mnist_serving_data.npz"))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--n", type=int, default=1000, help="images per manipulated set")
    parser.add_argument("--evidence-inputs", type=int, default=defaults.evidence_inputs)
    parser.add_argument("--window", type=int, default=defaults.drift_window)
    parser.add_argument("--alarm-z", type=float, default=defaults.drift_alarm_z)
    parser.add_argument("--clear-z", type=float, default=defaults.drift_clear_z)
    parser.add_argument("--clean-streams", type=int, default=5, help="shuffled clean streams")
    parser.add_argument("--horizon", type=int, default=1000, help="requests after a switch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--rule", choices=RULES, default=defaults.unusual_rule, help="the live service's unusual rule"
    )
    parser.add_argument("--log-dir", type=Path, default=Path("logs"), help="the live service's log")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--no-metrics", action="store_true")
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated, of {SECTIONS} (the validation suite measures scores only)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sections = [part for part in args.sections.split(",") if part]
    if unknown := set(sections) - set(SECTIONS):
        parser.error(f"unknown sections {sorted(unknown)}")
    if args.suite == "validation":
        sections = [part for part in sections if part == "scores"]
    if "routing" in sections and "auto_adapt" not in sections:
        parser.error("routing uses the versions the auto_adapt section publishes")
    if "scores" in sections:
        scores_section(args)
    if "auto_adapt" in sections:
        live_section(args, routed="routing" in sections)


def scores_section(args: argparse.Namespace) -> None:
    defaults = Settings()
    k, screen = defaults.k, defaults.screen_margin
    config = DriftConfig(args.window, args.alarm_z, args.clear_z)
    mnist = load_mnist(args.data_dir)
    rng = np.random.default_rng(0)
    sets: dict[str, np.ndarray] = {}
    if args.suite == "mnistc":
        clean_x = mnist.test.x
        pick = np.sort(rng.choice(len(clean_x), size=min(args.n, len(clean_x)), replace=False))
        corrupted = load_mnist_c(args.data_dir)
        sets = {c: corrupted.images[c][pick] for c in MNISTC_CORRUPTIONS}
    else:
        _, val = validation_split(mnist.train, 0.05, 0)
        held = val.x[2 * args.evidence_inputs :]  # never the canary the score is calibrated or fitted on
        clean_x = held
        base = held[: args.n]
        for name, level in TENT_VALIDATION:
            sets[f"{name}_{level:g}"] = named(name, level)(base, np.random.default_rng(1)).astype(np.float32)
        sets["uniform_noise"] = rng.random(base.shape, dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="cama-drift-") as tmp:
        registry = mnist_store(Path(tmp), args.checkpoint, args.serving_data)
        evidence = EvidenceSettings(args.evidence_inputs, k, screen, defaults.chunk_work)
        version = load_version(registry, "mnist", 1, threads=args.threads, evidence=evidence)
        clean_by_rule, clean_f = unusual_scores(version, clean_x, k, screen, seed=1)
        scored = {name: unusual_scores(version, x, k, screen, seed=2) for name, x in sets.items()}
        shifted_by_rule = {name: by_rule for name, (by_rule, _) in scored.items()}
        ridges = None
        if args.suite == "validation":
            ridges = class_ridge_sweep(
                version,
                ServingData.load(args.serving_data),
                args.evidence_inputs,
                clean_f,
                {name: f for name, (_, f) in scored.items()},
            )
    rules = {
        rule: float(np.mean([auroc(clean_by_rule[rule], v[rule]) for v in shifted_by_rule.values()]))
        for rule in RULES
    }
    print("mean AUROC by rule: " + ", ".join(f"{r} {a:.3f}" for r, a in rules.items()), flush=True)
    served = defaults.unusual_rule  # what the service serves; the rest below is that rule's
    clean = clean_by_rule[served]
    shifted = {name: v[served] for name, v in shifted_by_rule.items()}
    print(f"clean: {len(clean)} images, mean unusual {clean.mean():.3f} (1/2 if calibrated)", flush=True)
    false_alarms = sum(alarms_on(rng.permutation(clean), config) for _ in range(args.clean_streams))
    per_10k = false_alarms * 10000 / (args.clean_streams * len(clean))
    rows: dict[str, dict[str, float]] = {}
    for name, scores in shifted.items():
        rows[name] = {
            "auroc": auroc(clean, scores),
            "mean_unusual": float(scores.mean()),
            "requests_to_alarm": float(
                requests_to_alarm(rng.permutation(clean), scores, config, args.horizon)
            ),
        }
        r = rows[name]
        print(
            f"{name:16s} AUROC {r['auroc']:.3f}  mean unusual {r['mean_unusual']:.3f}  "
            f"requests to alarm {int(r['requests_to_alarm'])}",
            flush=True,
        )
    mean_auroc = float(np.mean([r["auroc"] for r in rows.values()]))
    median_rta = float(np.median([r["requests_to_alarm"] for r in rows.values()]))
    print(
        f"mean AUROC {mean_auroc:.3f}; median requests to alarm {median_rta:g}; "
        f"false alarms per 10k clean requests {per_10k:.2f} ({false_alarms} in "
        f"{args.clean_streams * len(clean)})"
    )
    report: dict[str, Any] = {
        "suite": args.suite,
        "checkpoint": str(args.checkpoint),
        "k": k,
        "screen": screen,
        "evidence_inputs": args.evidence_inputs,
        "rule": served,
        "auroc_mean_by_rule": rules,
        "class_ridge": CLASS_RIDGE,
        "auroc_mean_by_class_ridge": ridges,
        "auroc_by_rule": {
            name: {rule: auroc(clean_by_rule[rule], v[rule]) for rule in RULES}
            for name, v in shifted_by_rule.items()
        },
        "drift": asdict(config),
        "clean_images": len(clean),
        "clean_mean_unusual": float(clean.mean()),
        "false_alarms": false_alarms,
        "false_alarms_per_10k": per_10k,
        "auroc_mean": mean_auroc,
        "requests_to_alarm_median": median_rta,
        "horizon": args.horizon,
        "sets": rows,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    name = "drift.json" if args.suite == "mnistc" else "drift_val.json"
    (args.results_dir / name).write_text(json.dumps(report, indent=2) + "\n")
    if args.suite == "mnistc" and not args.no_metrics:
        metrics = {f"drift.auroc.{c}": r["auroc"] for c, r in rows.items()}
        metrics |= {f"drift.detect.requests_to_alarm.{c}": r["requests_to_alarm"] for c, r in rows.items()}
        metrics["drift.auroc.mean"] = mean_auroc
        metrics["drift.detect.requests_to_alarm.median"] = median_rta
        metrics["drift.false_alarms_per_10k"] = per_10k
        update_metrics(metrics)


def live_section(args: argparse.Namespace, *, routed: bool) -> None:
    """Auto-adapt from live traffic and routing (:mod:`benchmarks.live_adapt`)."""
    defaults = Settings()
    mnist = load_mnist(args.data_dir)
    corrupted = load_mnist_c(args.data_dir)
    sets = corruption_sets(corrupted.images, mnist.test.y)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cama-live-") as tmp:
        store = mnist_store(Path(tmp), args.checkpoint, args.serving_data).root
        common = {"k": defaults.k, "screen": defaults.screen_margin, "threads": args.threads}
        runs = live_adaptation(store, args.log_dir, sets, mnist.test.x, rule=args.rule, **common)
        routes = routing(store, runs, sets, mnist.test, **common) if routed else None
    accuracy = {r.corruption: r.accuracy for r in runs}
    mean = float(np.mean(list(accuracy.values())))
    accepted = sum(1 for r in runs if r.job is not None and r.job["state"] == "succeeded")
    started = sum(1 for r in runs if r.job is not None)
    seconds = float(np.median([r.seconds for r in runs if r.job is not None])) if started else float("nan")
    print(f"auto-adapt MNIST-C mean {mean:.3f}; jobs started {started}, accepted {accepted}")
    report: dict[str, Any] = {
        "checkpoint": str(args.checkpoint),
        "k": defaults.k,
        "screen": defaults.screen_margin,
        "settings": {
            "unusual_rule": args.rule,
            "auto_adapt_inputs": defaults.auto_adapt_inputs,
            "auto_adapt_min_unusual": defaults.auto_adapt_min_unusual,
            "drift_window": defaults.drift_window,
            "drift_alarm_z": defaults.drift_alarm_z,
        },
        "mnistc_mean": mean,
        "jobs_started": started,
        "jobs_accepted": accepted,
        "median_seconds_to_adapted": seconds,
        "runs": [asdict(r) for r in runs],
        "routing": routes,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "live_adapt.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.no_metrics:
        return
    metrics = {f"drift.auto_adapt.{c}": a for c, a in accuracy.items()}
    metrics |= {
        "drift.auto_adapt.mnistc_mean": mean,
        "drift.auto_adapt.jobs_started": float(started),
        "drift.auto_adapt.jobs_accepted": float(accepted),
    }
    if routes is not None:
        metrics["drift.routing.mixed_accuracy"] = routes["mixed_accuracy"]
        metrics["drift.routing.best_single_accuracy"] = routes["best_single_accuracy"]
    update_metrics(metrics)


if __name__ == "__main__":
    main()

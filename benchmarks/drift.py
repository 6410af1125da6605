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
import hashlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.core.config import Settings
from app.serving import EvidenceSettings, LoadedVersion, load_version
from benchmarks.drift_scores import (
    MUTATION,
    BaselineOutputs,
    PixelBackground,
    baseline_outputs,
    code_length,
    complexity_corrected,
    load_baselines,
)
from benchmarks.drift_stream import alarms_on, requests_to_alarm
from benchmarks.live_adapt import corruption_sets, live_adaptation, routing
from cama.checkpoint import load_checkpoint
from cama.drift import DriftConfig
from cama.novelty import (
    CLASS_RIDGE,
    RULES,
    EvidenceReference,
    MGaussian,
    log_evidence,
    m_features,
    share_below,
)
from experiments.evaluate_mnistc import TENT_VALIDATION
from harness.stores import mnist_store
from store.data import Inputs, ServingData
from training.data import MNISTC_CORRUPTIONS, load_mnist, load_mnist_c, validation_split
from training.manipulations import named
from training.metrics import update_metrics

RESULTS = Path("benchmarks/results")
CACHE = Path(".cache/drift")  # CAMA's log p(x) and q(m|x) per image, and the stream detectors' inputs
BLOCK = 1000  # images per cached block of CAMA's outputs
CLASS_RIDGES = (0.01, 0.03, 0.1, 0.3, 1.0)  # the class Gaussian's ridges the validation suite compares
SECTIONS = ("scores", "baselines", "auto_adapt", "routing")
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


def blocks(images: dict[str, np.ndarray]) -> list[tuple[str, int]]:
    """The ``(set, first image)`` blocks of ``BLOCK`` images CAMA's outputs are computed and cached in."""
    return [(name, start) for name, x in images.items() for start in range(0, len(x), BLOCK)]


def shard_path(suite: str, shard: int, shards: int) -> Path:
    return CACHE / f"{suite}.{shard}of{shards}.npz"


def cached_outputs(
    suite: str, key: dict[str, Any]
) -> tuple[dict[str, np.ndarray], tuple[EvidenceReference, np.ndarray] | None]:
    """Every cached block of CAMA's outputs (``lp/<set>/<start>``, ``f/<set>/<start>``) under
    ``key``, from every shard file of ``suite``, and the cached clean reference (or None)."""
    held: dict[str, np.ndarray] = {}
    reference = None
    for path in sorted(CACHE.glob(f"{suite}.*of*.npz")):
        with np.load(path, allow_pickle=True) as data:
            if json.loads(str(data["key"])) != key:
                continue
            held |= {name: data[name] for name in data.files if name.startswith(("lp/", "f/"))}
            if "reference" in data.files:
                reference = data["reference"].item()
    return held, reference


def compute_blocks(
    version: LoadedVersion,
    images: dict[str, np.ndarray],
    todo: list[tuple[str, int]],
    k: int,
    screen: float | None,
    save: Callable[[dict[str, np.ndarray]], None] | None = None,
) -> dict[str, np.ndarray]:
    """``log p(x)`` and q(m|x)'s summary of the blocks ``todo`` (``lp/<set>/<start>``,
    ``f/<set>/<start>``), with the noise one pass over the set draws (seed 1 for ``clean``, 2 for
    the rest); ``save`` is given what is done after each block."""
    out: dict[str, np.ndarray] = {}
    for name, start in todo:
        seed = (1 if name == "clean" else 2) + start
        lp, f = evidence_and_features(version, images[name][start : start + BLOCK], k, screen, seed)
        out[f"lp/{name}/{start}"], out[f"f/{name}/{start}"] = lp, f
        print(f"CAMA's outputs: {name} {start}+{len(lp)}", flush=True)
        if save is not None:
            save(out)
    return out


def assemble(
    images: dict[str, np.ndarray], held: dict[str, np.ndarray]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each set's ``(log p(x), q(m|x) summaries)`` from its blocks."""
    return {
        name: (
            np.concatenate([held[f"lp/{name}/{s}"] for s in range(0, len(x), BLOCK)]),
            np.concatenate([held[f"f/{name}/{s}"] for s in range(0, len(x), BLOCK)]),
        )
        for name, x in images.items()
    }


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def baseline_scores(baselines: dict[str, dict[str, BaselineOutputs]]) -> dict[str, dict[str, np.ndarray]]:
    """``msp_<model>`` and ``energy_<model>`` of each baseline on each named set."""
    scores: dict[str, dict[str, np.ndarray]] = {}
    for model, by_set in baselines.items():
        scores[f"msp_{model}"] = {name: out.msp for name, out in by_set.items()}
        scores[f"energy_{model}"] = {name: out.energy for name, out in by_set.items()}
    return scores


def other_scores(
    outputs: dict[str, tuple[np.ndarray, np.ndarray]],
    baselines: dict[str, dict[str, BaselineOutputs]],
    bits: dict[str, np.ndarray],
    background: PixelBackground,
    images: dict[str, np.ndarray],
) -> dict[str, dict[str, np.ndarray]]:
    """Every per-input score of :mod:`benchmarks.drift_scores` on each named set: score -> set ->
    ``(N,)``, higher is more unusual."""
    scores = baseline_scores(baselines)
    scores["log_px"] = {name: -lp for name, (lp, _) in outputs.items()}
    scores["log_px_complexity"] = {
        name: complexity_corrected(lp, bits[name]) for name, (lp, _) in outputs.items()
    }
    scores["log_px_ratio"] = {name: background.log_px(images[name]) - lp for name, (lp, _) in outputs.items()}
    return scores


def class_shares(
    canary: tuple[np.ndarray, np.ndarray, np.ndarray], features: list[np.ndarray], ridge: float = CLASS_RIDGE
) -> list[np.ndarray]:
    """The ``m_class`` rule's score (:mod:`cama.novelty`) of each array of q(m|x) summaries, from
    the canary's (``canary`` = ranked, fitted, the fitted ones' labels) as the service calibrates it."""
    ranked, fit, labels = canary
    model = MGaussian.fit(fit, labels, ridge)
    reference = np.sort(model.distance(ranked))
    return [share_below(reference, model.distance(f)) for f in features]


def class_ridge_sweep(
    canary: tuple[np.ndarray, np.ndarray, np.ndarray],
    clean: np.ndarray,
    shifted: dict[str, np.ndarray],
) -> dict[str, float]:
    """Mean AUROC of the ``m_class`` rule for each ridge in ``CLASS_RIDGES``: the class Gaussian
    fitted on the canary's second half (``canary`` = ranked, fitted, their labels), ranked on its
    first (as the service does); ``clean`` and ``shifted`` are q(m|x) summaries."""
    out: dict[str, float] = {}
    for ridge in CLASS_RIDGES:
        clean_u, *rest = class_shares(canary, [clean, *shifted.values()], ridge)
        out[f"{ridge:g}"] = float(np.mean([auroc(clean_u, u) for u in rest]))
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
    parser.add_argument("--no-cache", action="store_true", help=f"recompute CAMA's outputs (cache: {CACHE})")
    parser.add_argument(
        "--shard",
        type=lambda text: tuple(int(v) for v in text.split("/")),
        default=None,
        metavar="I/N",
        help="only compute and cache the I-th of N shares of CAMA's outputs (parallel runs), then stop",
    )
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
        sections = [part for part in sections if part in ("scores", "baselines")]
    if "routing" in sections and "auto_adapt" not in sections:
        parser.error("routing uses the versions the auto_adapt section publishes")
    if "scores" in sections:
        scores_section(args)
    elif "baselines" in sections:  # the scores section measures them too
        baselines_section(args)
    if "auto_adapt" in sections:
        live_section(args, routed="routing" in sections)


def suite_images(
    args: argparse.Namespace, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The suite's images by set (``clean`` first) and the training images (not the validation
    split) that background models may be fitted on."""
    mnist = load_mnist(args.data_dir)
    sets: dict[str, np.ndarray] = {}
    train, val = validation_split(mnist.train, 0.05, 0)
    if args.suite == "mnistc":
        clean_x = mnist.test.x
        pick = np.sort(rng.choice(len(clean_x), size=min(args.n, len(clean_x)), replace=False))
        corrupted = load_mnist_c(args.data_dir)
        sets = {c: corrupted.images[c][pick] for c in MNISTC_CORRUPTIONS}
    else:
        held = val.x[2 * args.evidence_inputs :]  # never the canary the score is calibrated or fitted on
        clean_x = held
        base = held[: args.n]
        for name, level in TENT_VALIDATION:
            sets[f"{name}_{level:g}"] = named(name, level)(base, np.random.default_rng(1)).astype(np.float32)
        sets["uniform_noise"] = rng.random(base.shape, dtype=np.float32)
    return {"clean": clean_x, **sets}, train.x


def score_aurocs(
    scores: dict[str, dict[str, np.ndarray]],
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """AUROC of each score (score -> set -> ``(N,)``) on each set against ``clean``, and the means."""
    by_set = {
        score: {name: auroc(v["clean"], v[name]) for name in v if name != "clean"}
        for score, v in scores.items()
    }
    return by_set, {score: float(np.mean(list(v.values()))) for score, v in by_set.items()}


def baselines_section(args: argparse.Namespace) -> None:
    """The discriminative baselines' scores alone (no CAMA pass): ``drift_baselines[_val].json``
    and, for MNIST-C, their keys."""
    images, _ = suite_images(args, np.random.default_rng(0))
    baselines = {
        name: {set_name: baseline_outputs(model, x) for set_name, x in images.items()}
        for name, model in load_baselines().items()
    }
    by_set, means = score_aurocs(baseline_scores(baselines))
    print("mean AUROC by score: " + ", ".join(f"{s} {a:.3f}" for s, a in means.items()), flush=True)
    report = {"suite": args.suite, "auroc_mean_by_score": means, "auroc_by_score": by_set}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    name = "drift_baselines.json" if args.suite == "mnistc" else "drift_baselines_val.json"
    (args.results_dir / name).write_text(json.dumps(report, indent=2) + "\n")
    if args.suite == "mnistc":
        cheap_streams(args, images, baselines)
    if args.suite == "mnistc" and not args.no_metrics:
        update_metrics(score_keys(by_set, means))


def cheap_streams(
    args: argparse.Namespace, images: dict[str, np.ndarray], baselines: dict[str, dict[str, BaselineOutputs]]
) -> None:
    """The stream detectors' inputs without CAMA's ``log p(x)``: q(m|x) comes from the checkpoint's
    encoder (the torch path the service computes it on) and the unusual score from the ``m_class``
    rule, which reads q(m|x) only; refused when the service serves another rule."""
    if Settings().unusual_rule != "m_class":
        raise SystemExit("the baselines section's streams need the m_class rule; run the scores section")
    serving = ServingData.load(args.serving_data)
    n = args.evidence_inputs
    model, _ = load_checkpoint(args.checkpoint)
    canary_f = m_features(model, serving.canary.x[: 2 * n])
    features = {
        name: np.concatenate([m_features(model, x[i : i + 500]) for i in range(0, len(x), 500)])
        for name, x in images.items()
    }
    canary = reference_features(canary_f, serving, n)
    unusual = dict(zip(features, class_shares(canary, list(features.values())), strict=True))
    ref = baseline_outputs(load_baselines()["dnn_generic"], serving.canary.x[: 2 * n])
    save_streams(CACHE / "streams_mnistc.npz", ref, baselines["dnn_generic"], canary_f, features, unusual)


def score_keys(by_set: dict[str, dict[str, float]], means: dict[str, float]) -> dict[str, float]:
    """``drift.auroc.<set>.<score>`` and ``drift.auroc.mean.<score>``."""
    keys = {f"drift.auroc.{name}.{score}": a for score, v in by_set.items() for name, a in v.items()}
    return keys | {f"drift.auroc.mean.{score}": a for score, a in means.items()}


def scores_section(args: argparse.Namespace) -> None:
    defaults = Settings()
    k, screen = defaults.k, defaults.screen_margin
    config = DriftConfig(args.window, args.alarm_z, args.clear_z)
    rng = np.random.default_rng(0)
    images, train_x = suite_images(args, rng)
    serving = ServingData.load(args.serving_data)
    canary = serving.canary.take(slice(0, 2 * args.evidence_inputs)).x
    key = {
        "checkpoint": file_digest(args.checkpoint),
        "serving_data": file_digest(args.serving_data),
        "k": k,
        "screen": screen,
        "evidence_inputs": args.evidence_inputs,
        "n": args.n,
        "sets": sorted(images),
    }
    held: dict[str, np.ndarray] = {}
    reference: tuple[EvidenceReference, np.ndarray] | None = None
    if not args.no_cache:
        held, reference = cached_outputs(args.suite, key)
    todo = blocks(images)
    if args.shard is not None:
        shard, shards = args.shard
        todo = todo[shard::shards]
    missing = [b for b in todo if f"lp/{b[0]}/{b[1]}" not in held]
    version = None
    with tempfile.TemporaryDirectory(prefix="cama-drift-") as tmp:
        if missing or reference is None:
            registry = mnist_store(Path(tmp), args.checkpoint, args.serving_data)
            evidence = EvidenceSettings(args.evidence_inputs, k, screen, defaults.chunk_work)
            version = load_version(registry, "mnist", 1, threads=args.threads, evidence=evidence)
            assert version.evidence is not None
            canary_f = version.m_features(serving.canary.take(slice(0, 2 * args.evidence_inputs)))
            reference = (version.evidence, canary_f)
        print(
            f"CAMA's outputs: {len(todo) - len(missing)} blocks cached, {len(missing)} to compute", flush=True
        )
        shard, shards = args.shard or (0, 1)

        def save(new: dict[str, np.ndarray]) -> None:
            if args.no_cache:
                return
            CACHE.mkdir(parents=True, exist_ok=True)
            packed = np.empty((), dtype=object)
            packed[()] = reference
            path = shard_path(args.suite, shard, shards)
            with path.with_suffix(".part").open("wb") as out:  # renamed into place: never half-written
                np.savez(out, key=json.dumps(key), reference=packed, **(held | new))  # type: ignore[arg-type]
            path.with_suffix(".part").replace(path)

        new = compute_blocks(version, images, missing, k, screen, save) if version is not None else {}
    if args.shard is not None:
        return
    outputs = assemble(images, held | new)
    assert reference is not None
    served_reference, canary_f = reference
    bits = {name: code_length(x) for name, x in images.items()}
    by_rule = {
        name: {rule: served_reference.unusual(lp, f, rule) for rule in RULES}
        for name, (lp, f) in outputs.items()
    }
    clean_by_rule = by_rule.pop("clean")
    shifted_by_rule = by_rule
    ridges = None
    if args.suite == "validation":
        ridges = class_ridge_sweep(
            reference_features(canary_f, serving, args.evidence_inputs),
            outputs["clean"][1],
            {name: f for name, (_, f) in outputs.items() if name != "clean"},
        )
    models = load_baselines()
    baselines = {
        name: {set_name: baseline_outputs(model, x) for set_name, x in images.items()}
        for name, model in models.items()
    }
    background = PixelBackground.fit(train_x)
    others = other_scores(outputs, baselines, bits, background, images)
    other_auroc, other_means = score_aurocs(others)
    rules = {
        rule: float(np.mean([auroc(clean_by_rule[rule], v[rule]) for v in shifted_by_rule.values()]))
        for rule in RULES
    }
    print("mean AUROC by rule: " + ", ".join(f"{r} {a:.3f}" for r, a in rules.items()), flush=True)
    print("mean AUROC by score: " + ", ".join(f"{s} {a:.3f}" for s, a in other_means.items()), flush=True)
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
        "auroc_mean_by_score": other_means,
        "auroc_by_score": other_auroc,
        "background_mutation": MUTATION,
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
    if args.suite == "mnistc":
        ref = baseline_outputs(models["dnn_generic"], canary)
        save_streams(
            CACHE / "streams_mnistc.npz",
            ref,
            baselines["dnn_generic"],
            canary_f,
            {name: f for name, (_, f) in outputs.items()},
            {"clean": clean, **shifted},
        )
    if args.suite == "mnistc" and not args.no_metrics:
        metrics = {f"drift.auroc.{c}": r["auroc"] for c, r in rows.items()}
        metrics |= {f"drift.detect.requests_to_alarm.{c}": r["requests_to_alarm"] for c, r in rows.items()}
        metrics["drift.auroc.mean"] = mean_auroc
        metrics["drift.detect.requests_to_alarm.median"] = median_rta
        metrics["drift.false_alarms_per_10k"] = per_10k
        metrics |= score_keys(other_auroc, other_means)
        update_metrics(metrics)


def reference_features(
    canary_f: np.ndarray, serving: ServingData, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The canary's q(m|x) summaries: the first ``n`` (ranked), the second ``n`` (fitted) and
    their labels."""
    return canary_f[:n], canary_f[n : 2 * n], serving.canary_y[n : 2 * n]


def save_streams(
    path: Path,
    ref: BaselineOutputs,
    dnn: dict[str, BaselineOutputs],
    canary_f: np.ndarray,
    features: dict[str, np.ndarray],
    unusual: dict[str, np.ndarray],
) -> None:
    """The stream detectors' inputs (:mod:`benchmarks.drift_online`): for the reference (the
    canary) and every set, the DNN's penultimate activations and softmax outputs, q(m|x)'s mean
    and (not for the reference) the service's unusual score."""
    dims = canary_f.shape[1] // 2
    arrays = {"ref/dnn": ref.features, "ref/dnn_softmax": ref.softmax, "ref/m": canary_f[:, :dims]}
    for name, out in dnn.items():
        arrays |= {f"{name}/dnn": out.features, f"{name}/dnn_softmax": out.softmax}
        arrays[f"{name}/m"] = features[name][:, :dims]
        arrays[f"{name}/unusual"] = unusual[name]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)  # type: ignore[arg-type]


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

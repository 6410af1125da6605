"""Adaptation on the streams users have: mixed corruptions, label shift, small batches, one after another.

    python -m benchmarks.streams                  # every protocol and method
    python -m benchmarks.streams --quick          # a smoke test: tiny streams, its JSON in --cache-dir
    python -m benchmarks.streams --methods cama_service --protocols mixed   # a part; the rest cached

Streams (:mod:`training.streams`, seeded, the same for every method) are built from MNIST-C's test
corruptions (``mnist_c_test.npz``, :func:`training.data.load_mnist_c`) and the clean MNIST test set,
sized by ``FULL`` (``QUICK`` for ``--quick``):

- ``iid``, ``label_shift`` (Dirichlet(0.1) class proportions), ``class_sorted``, ``batch1``,
  ``batch4``, ``batch16``: per corruption of ``PER_SOURCE_CORRUPTIONS``, ``per_source`` images
  each (one fixed random draw of test rows per corruption; ``label_shift`` draws its own rows),
  batches of 100 unless named;
- ``mixed``: ``whole`` images of every one of the 15 corruptions, shuffled into one stream;
- ``continual``: ``clean`` clean images, then the 15 corruptions (``whole`` images each) one
  after another, then the same clean images again.

Each method's answers are kept under ``--cache-dir`` as they are measured, so a part can be
measured on its own (``--methods``, ``--protocols``) and an interrupted run goes on where it
stopped; the page, the plot, ``streams.json`` and the metrics are written once every method has
answered every protocol (a ``--protocols`` subset or ``--quick`` writes its JSON to the cache folder).

Methods, each answering every image once, in stream order:

- ``dnn_generic``: the DNN trained with the generic manipulations (``--dnn``), not adapted;
- ``bn_adapt``: the dense-head BN-CNN (``--bncnn``) with BatchNorm on each batch's statistics;
- ``tent_online``: TENT (:mod:`training.tent`) on that BN-CNN, one step per batch, online;
- ``sar``: SAR (:mod:`training.sar`) on the same network, one step per batch, online;
- ``cama``: the served CAMA as ``POST /predict`` answers it (ONNX Runtime, the first-sample screen,
  the default K), not adapted;
- ``cama_service``: the running service in auto-adapt mode, the stream posted at ``--rate``
  images per second (:mod:`benchmarks.stream_service`); each image scored by the answer the
  service gave then.

The BN-CNN methods restart from the trained network at each corruption of a per-corruption
protocol (the reference protocol: they are told where a corruption begins) and never in ``mixed``
or ``continual``. The service is told nothing: it keeps running through a stream and starts afresh
only between protocols. At batch 1 the dense head's BatchNorm normalises each unit by that one
image's own value (an input repeated twice has the same batch statistics), which is what test-batch
statistics are at batch 1.

TENT's step size and SAR's step size and entropy margin are chosen per protocol on the same
protocol's streams built from the validation split of MNIST's training set under
``training.manipulations``' named manipulations (the ones TENT's step size is chosen on), never on
MNIST-C: the best mean online accuracy wins.

Writes ``docs/results/streams.md`` (tables), ``docs/results/streams.png`` (accuracy along each
stream), ``benchmarks/results/streams.json`` and the keys ``stream.<protocol>.<method>`` (mean
online accuracy), ``stream.<protocol>.<corruption>.<method>`` and
``stream.continual.clean_start.<method>`` / ``clean_end`` in ``docs/results/metrics.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from copy import deepcopy
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from app.core.config import Settings
from app.serving import load_version
from benchmarks.live_adapt import log_weights
from benchmarks.stream_report import write_report
from benchmarks.stream_service import ServiceRun, StreamService, describe_jobs
from cama.checkpoint import sha256_file
from experiments.evaluate_mnistc import TENT_LRS, TENT_VALIDATION
from harness.stores import mnist_store
from store.registry import ModelRegistry
from training.baselines import load_baseline, predict
from training.data import MNISTC_CORRUPTIONS, VAL_FRACTION, load_mnist, load_mnist_c, validation_split
from training.manipulations import named
from training.metrics import update_metrics
from training.sar import setup_sar
from training.streams import CLEAN, PROTOCOLS, Stream, build_streams, draw_pool
from training.tent import configure_model, setup_tent

RESULTS = Path("benchmarks/results")
DOCS = Path("docs/results")
METHODS = ("dnn_generic", "bn_adapt", "tent_online", "sar", "cama", "cama_service")
BN_METHODS = ("bn_adapt", "tent_online", "sar")
# the corruptions of the per-corruption protocols: a noise, a change of contrast and a change of
# the strokes' shape
PER_SOURCE_CORRUPTIONS = ("impulse_noise", "fog", "zigzag")
SAR_LRS = (1e-3, 1e-2, 3e-2, 1e-1)
SAR_MARGINS = (0.4, 0.6)  # E0 = factor * ln C; the paper's factor is 0.4
CURVE_WINDOW = 50


@dataclass(frozen=True)
class Sizes:
    """Images per stream part."""

    per_source: int  # per corruption, per-corruption protocols
    whole: int  # per corruption, mixed and continual
    clean: int  # each clean segment of continual


FULL = Sizes(per_source=200, whole=40, clean=100)
QUICK = Sizes(per_source=20, whole=4, clean=20)
VALIDATION = Sizes(per_source=50, whole=20, clean=50)
QUICK_VALIDATION = Sizes(per_source=20, whole=10, clean=20)
VALIDATION_SMALL_BATCH = 20  # images per manipulation in the validation streams of batch1 and batch4
RATE = 5.0  # images per second posted to the service


# --- the BN-CNN methods ---------------------------------------------------------------------------

Adapter = Callable[[Tensor], Tensor]


def adapter(method: str, network: nn.Module, config: Mapping[str, float]) -> Adapter:
    """A fresh copy of ``network`` under ``method``: a callable from a batch to its logits."""
    model = deepcopy(network)
    if method == "bn_adapt":
        configured = configure_model(model)

        def bn(x: Tensor) -> Tensor:
            with torch.no_grad():
                logits: Tensor = configured(x)
            return logits

        return bn
    if method == "tent_online":
        return setup_tent(model, lr=config["lr"])
    if method == "sar":
        return setup_sar(model, lr=config["lr"], margin_factor=config["margin"])
    raise ValueError(f"unknown method {method!r}")


def run_online(make: Callable[[], Adapter], stream: Stream, x: np.ndarray) -> np.ndarray:
    """The label each image of ``stream`` (images ``x``) gets from a method adapting online, reset at
    each segment where the protocol allows it; a batch of one is fed twice (same statistics)."""
    xt = torch.from_numpy(np.ascontiguousarray(x))
    out = np.empty(len(stream), np.int64)
    method = make()
    resets = {seg.start for seg in stream.segments} if stream.reset_at_segments else set()
    for start, stop in stream.batches():
        if start in resets and start > 0:
            method = make()
        xb = xt[start:stop]
        logits = method(torch.cat([xb, xb]))[:1] if stop - start == 1 else method(xb)
        out[start:stop] = logits.argmax(1).numpy()
    return out


def configs(method: str, quick: bool = False) -> list[dict[str, float]]:
    """The validation grid of ``method`` (two settings of it in a smoke test)."""
    grid: list[dict[str, float]] = [{}]
    if method == "tent_online":
        grid = [{"lr": lr} for lr in TENT_LRS]
    if method == "sar":
        grid = [{"lr": lr, "margin": m} for lr in SAR_LRS for m in SAR_MARGINS]
    return grid[:2] if quick else grid


def config_id(config: Mapping[str, float]) -> str:
    return ",".join(f"{k}={v:g}" for k, v in config.items()) or "-"


def validate(
    network: nn.Module, streams: Mapping[str, Stream], sets: Mapping[str, np.ndarray], quick: bool = False
) -> dict[str, dict[str, dict[str, float]]]:
    """Mean online accuracy of every configuration of TENT and SAR on each validation stream:
    ``{method: {config id: {protocol: accuracy}}}``."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    images = {p: s.images(sets) for p, s in streams.items()}
    for method in ("tent_online", "sar"):
        table[method] = {}
        for config in configs(method, quick):
            row = {}
            for protocol, stream in streams.items():
                labels = run_online(partial(adapter, method, network, config), stream, images[protocol])
                row[protocol] = float((labels == stream.label).mean())
            table[method][config_id(config)] = row
            print(f"  validation {method} {config_id(config)}: " + _fmt(row), flush=True)
    return table


def chosen(table: Mapping[str, Mapping[str, float]], protocol: str) -> str:
    """The configuration with the best validation accuracy on ``protocol`` (the first on a tie)."""
    return max(table, key=lambda cid: table[cid][protocol])


def parse_config(cid: str) -> dict[str, float]:
    return {} if cid == "-" else {k: float(v) for k, v in (part.split("=") for part in cid.split(","))}


def _fmt(row: Mapping[str, float]) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in row.items())


# --- CAMA as served ---------------------------------------------------------------------------


def served_labels(
    registry: ModelRegistry, streams: Mapping[str, Stream], sets: Mapping[str, np.ndarray], threads: int
) -> dict[str, np.ndarray]:
    """The label ``POST /predict``'s path gives each image of every stream (each distinct image
    scored once, in batches of 100 with fixed noise)."""
    defaults = Settings()
    version = load_version(registry, "mnist", 1, threads=threads)
    needed: dict[str, set[int]] = {}
    for stream in streams.values():
        for code, name in enumerate(stream.sources):
            needed.setdefault(name, set()).update(stream.index[stream.source == code].tolist())
    lookup: dict[str, np.ndarray] = {}
    for name, rows_set in needed.items():
        rows = np.array(sorted(rows_set))
        scores = log_weights(version, sets[name][rows], defaults.k, defaults.screen_margin, seed=0)
        table = np.full(len(sets[name]), -1, np.int64)
        table[rows] = scores.argmax(axis=1)
        lookup[name] = table
        print(f"  cama as served: {name} ({len(rows)} images)", flush=True)
    out = {}
    for protocol, stream in streams.items():
        labels = np.empty(len(stream), np.int64)
        for code, name in enumerate(stream.sources):
            at = stream.source == code
            labels[at] = lookup[name][stream.index[at]]
        out[protocol] = labels
    return out


# --- summaries --------------------------------------------------------------------------------


def summarise(stream: Stream, labels: np.ndarray) -> dict[str, Any]:
    """Mean accuracy, accuracy per corruption (per segment; ``clean_start``/``clean_end`` in
    continual; per source in mixed) and the accuracy of each window of ``CURVE_WINDOW`` images."""
    correct = labels == stream.label
    parts: dict[str, float] = {}
    if stream.protocol == "mixed":
        for code, name in enumerate(stream.sources):
            parts[name] = float(correct[stream.source == code].mean())
    else:
        for i, seg in enumerate(stream.segments):
            name = seg.name
            if name == CLEAN:
                name = "clean_start" if i == 0 else "clean_end"
            parts[name] = float(correct[seg.start : seg.stop].mean())
    curve = [float(correct[i : i + CURVE_WINDOW].mean()) for i in range(0, len(correct), CURVE_WINDOW)]
    return {"accuracy": float(correct.mean()), "parts": parts, "curve": curve}


def metric_keys(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, float]:
    """``stream.<protocol>.<method>`` and ``stream.<protocol>.<part>.<method>``."""
    keys = {}
    for protocol, by_method in results.items():
        for method, summary in by_method.items():
            keys[f"stream.{protocol}.{method}"] = summary["accuracy"]
            for part, value in summary["parts"].items():
                keys[f"stream.{protocol}.{part}.{method}"] = value
    return keys


# --- the command --------------------------------------------------------------------------------


def corruption_pools(labels: np.ndarray, names: tuple[str, ...], n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: draw_pool(labels, n, rng) for name in names}


class Cache:
    """Each method's answers per protocol (``<protocol>.<method>.npy``), the service's record of each
    stream, the validation tables and the seconds each part took, under a folder named by the
    streams' settings: a part already measured for the same streams is not measured again."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def labels(self, protocol: str, method: str) -> np.ndarray | None:
        path = self.root / f"{protocol}.{method}.npy"
        return np.load(path) if path.exists() else None

    def put_labels(self, protocol: str, method: str, labels: np.ndarray, seconds: float) -> None:
        np.save(self.root / f"{protocol}.{method}.npy", labels)
        self.add_seconds(f"{protocol}.{method}", seconds)

    def json(self, name: str) -> Any:
        path = self.root / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def put_json(self, name: str, value: Any) -> None:
        (self.root / f"{name}.json").write_text(json.dumps(value, indent=1) + "\n")

    def add_seconds(self, part: str, seconds: float) -> None:
        times = self.json("seconds") or {}
        times[part] = seconds
        self.put_json("seconds", times)


@dataclass
class Data:
    """The streams and everything their images are looked up in."""

    streams: dict[str, Stream]
    sets: dict[str, np.ndarray]
    images: dict[str, np.ndarray]
    warmup: np.ndarray
    per_source_names: tuple[str, ...]
    sizes: Sizes


def build_data(args: argparse.Namespace) -> Data:
    sizes = QUICK if args.quick else FULL
    names = PER_SOURCE_CORRUPTIONS[:2] if args.quick else PER_SOURCE_CORRUPTIONS
    mnist = load_mnist(args.data_dir)
    corrupted = load_mnist_c(args.data_dir)
    labels = mnist.test.y
    sets = {CLEAN: mnist.test.x, **corrupted.images}
    per_source = corruption_pools(labels, names, sizes.per_source, args.seed)
    whole = corruption_pools(labels, MNISTC_CORRUPTIONS, sizes.whole, args.seed + 1)
    rows = np.random.default_rng(args.seed + 2).permutation(len(labels))
    clean, warmup = np.sort(rows[: sizes.clean]), rows[sizes.clean : sizes.clean + 100]
    streams = build_streams(args.protocols, per_source, whole, labels, args.seed, clean=clean)
    images = {p: s.images(sets) for p, s in streams.items()}
    return Data(streams, sets, images, mnist.test.x[warmup], names, sizes)


def validation_name(args: argparse.Namespace) -> str:
    """The validation tables' name in the cache: they depend on the validation streams only."""
    sizes = QUICK_VALIDATION if args.quick else VALIDATION
    return f"../validation-seed{args.seed}-" + "-".join(f"{k}{v}" for k, v in asdict(sizes).items())


def validation_streams(args: argparse.Namespace) -> tuple[dict[str, Stream], dict[str, np.ndarray]]:
    """The protocols on ``training.manipulations``' named manipulations of the validation split;
    the per-source streams run the manipulations one after another without a restart, so that a
    setting is judged over several batches of 100 (a pool per manipulation small enough to keep
    the grid affordable holds one); ``batch1`` and ``batch4``, whose steps cost the most per
    image, take the first ``VALIDATION_SMALL_BATCH`` images of each pool."""
    sizes = QUICK_VALIDATION if args.quick else VALIDATION
    _, val = validation_split(load_mnist(args.data_dir).train, VAL_FRACTION, 0)
    rng = np.random.default_rng(0)
    sets = {CLEAN: val.x}
    for name, level in TENT_VALIDATION:
        sets[f"{name}_{level:g}"] = named(name, level)(val.x, rng).astype(np.float32)
    manipulations = tuple(n for n in sets if n != CLEAN)
    clean = np.sort(np.random.default_rng(args.seed + 13).permutation(len(val.y))[: sizes.clean])
    pools = corruption_pools(val.y, manipulations, sizes.per_source, args.seed + 10)
    few = {name: rows[:VALIDATION_SMALL_BATCH] for name, rows in pools.items()}
    whole = corruption_pools(val.y, manipulations, sizes.whole, args.seed + 11)
    streams = build_streams(PROTOCOLS, pools, whole, val.y, args.seed + 12, clean=clean)
    streams |= build_streams(("batch1", "batch4"), few, whole, val.y, args.seed + 12, clean=clean)
    return {p: dataclasses.replace(st, reset_at_segments=False) for p, st in streams.items()}, sets


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=Path("models/mnist_cama.pt"))
    parser.add_argument("--serving-data", type=Path, default=Path("models/mnist_serving_data.npz"))
    parser.add_argument("--dnn", type=Path, default=Path("models/mnist_dnn_generic.pt"))
    parser.add_argument("--bncnn", type=Path, default=Path("models/mnist_bncnn_flat.pt"))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--rate", type=float, default=RATE, help="images per second posted to the service")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny streams; its JSON in --cache-dir only")
    parser.add_argument(
        "--cache-dir", type=Path, default=Path("logs/streams"), help="answers measured so far"
    )
    parser.add_argument("--log-dir", type=Path, default=Path("logs"))
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--docs-dir", type=Path, default=DOCS)
    parser.add_argument("--no-metrics", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    data = build_data(args)
    key = f"seed{args.seed}-" + "-".join(f"{k}{v}" for k, v in asdict(data.sizes).items())
    cache = Cache(args.cache_dir / f"{key}-{len(data.per_source_names)}corruptions")
    for protocol, stream in data.streams.items():
        print(f"{protocol}: {len(stream)} images, batches of {stream.batch}", flush=True)
    measure(args, data, cache)
    assemble(args, data, cache)


def measure(args: argparse.Namespace, data: Data, cache: Cache) -> None:
    """Every requested method on every requested protocol not in the cache yet."""
    network, _ = load_baseline(args.bncnn)
    network.eval()
    missing = {m: [p for p in data.streams if cache.labels(p, m) is None] for m in args.methods}
    if "cama_service" in missing:  # measured again at another rate
        missing["cama_service"] = [
            p
            for p in data.streams
            if (rec := cache.json(f"{p}.service")) is None or rec["rate_images_per_s"] != args.rate
        ]
    if missing.get("dnn_generic"):
        dnn, _ = load_baseline(args.dnn)
        for protocol in missing["dnn_generic"]:
            started = time.monotonic()
            cache.put_labels(
                protocol, "dnn_generic", predict(dnn, data.images[protocol]), time.monotonic() - started
            )
    val_name = validation_name(args)
    if any(missing.get(m) for m in ("tent_online", "sar")) and cache.json(val_name) is None:
        print("validation (training.manipulations on the validation split):", flush=True)
        started = time.monotonic()
        val_streams, val_sets = validation_streams(args)
        cache.put_json(val_name, validate(network, val_streams, val_sets, args.quick))
        cache.add_seconds("validation", time.monotonic() - started)
    validation = cache.json(val_name) or {}
    for method in BN_METHODS:
        for protocol in missing.get(method, []):
            config = parse_config(chosen(validation[method], protocol)) if method in validation else {}
            started = time.monotonic()
            labels = run_online(
                partial(adapter, method, network, config), data.streams[protocol], data.images[protocol]
            )
            cache.put_labels(protocol, method, labels, time.monotonic() - started)
            print(
                f"{protocol}: {method} {float((labels == data.streams[protocol].label).mean()):.3f}",
                flush=True,
            )
    if not (missing.get("cama") or missing.get("cama_service")):
        return
    registry = seeded_store(args)
    with tempfile.TemporaryDirectory(prefix="cama-streams-") as tmp:
        if missing.get("cama"):
            started = time.monotonic()
            todo = {p: data.streams[p] for p in missing["cama"]}
            served = served_labels(registry, todo, data.sets, args.threads)
            for protocol, labels in served.items():
                cache.put_labels(protocol, "cama", labels, (time.monotonic() - started) / len(served))
        if missing.get("cama_service"):
            runner = StreamService(registry.root, Path(tmp), args.log_dir, args.threads)
            try:
                for protocol in missing["cama_service"]:
                    stream = data.streams[protocol]
                    run = runner.run(stream, data.images[protocol], data.warmup, args.rate)
                    cache.put_labels(protocol, "cama_service", run.labels, run.seconds)
                    summary = service_summary(run)
                    cache.put_json(f"{protocol}.service", summary)
                    jobs = ", ".join(f"{j['state']} missed {j['requests_missed']}" for j in summary["jobs"])
                    accuracy = float((run.labels == stream.label).mean())
                    took = f"{run.seconds:.0f} s; jobs: {jobs or 'none'}"
                    print(f"{protocol}: cama_service {accuracy:.3f} ({took})", flush=True)
            finally:
                runner.stop()


def seeded_store(args: argparse.Namespace) -> ModelRegistry:
    """The store seeded with the served checkpoint (ONNX exported once per checkpoint and kept in
    the cache; the service runs on copies of it)."""
    digest = sha256_file(args.checkpoint)[:12]
    root = args.cache_dir / f"store-{digest}"
    if not (root / "store" / "mnist" / "ACTIVE").exists():
        shutil.rmtree(root, ignore_errors=True)
        mnist_store(root, args.checkpoint, args.serving_data)
    return ModelRegistry(root / "store")


def assemble(args: argparse.Namespace, data: Data, cache: Cache) -> None:
    """The JSON report from the cache; with every method on every protocol (all of them, not a
    ``--protocols`` subset), the page, the plot and the metrics."""
    results: dict[str, dict[str, Any]] = {}
    missing = []
    for protocol, stream in data.streams.items():
        results[protocol] = {}
        for method in METHODS:
            labels = cache.labels(protocol, method)
            if labels is None:
                missing.append(f"{protocol}.{method}")
                continue
            results[protocol][method] = summarise(stream, labels)
    validation = cache.json(validation_name(args)) or {}
    choice = {m: {p: chosen(validation[m], p) for p in data.streams} for m in validation}
    seconds = cache.json("seconds") or {}
    service = {p: rec for p in data.streams if (rec := cache.json(f"{p}.service")) is not None}
    for protocol, rec in service.items():
        served, answered = cache.labels(protocol, "cama"), cache.labels(protocol, "cama_service")
        if served is not None and answered is not None:
            rec["v1_disagreement"] = v1_disagreement(rec, served, answered)
    report: dict[str, Any] = {
        "command": "python -m benchmarks.streams" + (" --quick" if args.quick else ""),
        "seed": args.seed,
        "rate_images_per_s": args.rate,
        "sizes": asdict(data.sizes),
        "validation_sizes": asdict(QUICK_VALIDATION if args.quick else VALIDATION),
        "validation_small_batch": VALIDATION_SMALL_BATCH,
        "per_source_corruptions": list(data.per_source_names),
        "curve_window": CURVE_WINDOW,
        "streams": {p: {"images": len(s), "batch": s.batch} for p, s in data.streams.items()},
        "checkpoints": {"cama": str(args.checkpoint), "dnn_generic": str(args.dnn), "bncnn": str(args.bncnn)},
        "validation": validation,
        "chosen": choice,
        "results": results,
        "service": service,
        "seconds": float(sum(seconds.values())),
        "seconds_by_part": seconds,
    }
    complete = not args.quick and set(data.streams) == set(PROTOCOLS)
    out = args.results_dir / "streams.json" if complete else cache.root / "streams_part.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}", flush=True)
    if missing:
        print(f"not measured yet: {', '.join(missing)}; the page waits for every method", flush=True)
        return
    for protocol, by_method in results.items():
        print(f"{protocol}: " + _fmt({m: s["accuracy"] for m, s in by_method.items()}), flush=True)
    if not complete:
        return  # the page and the metrics come from a run of every protocol
    write_report(report, args.docs_dir / "streams.md", args.docs_dir / "streams.png")
    if not args.no_metrics:
        update_metrics(metric_keys(results))


def v1_disagreement(record: Mapping[str, Any], served: np.ndarray, answered: np.ndarray) -> float:
    """The share of the images the service answered with v1 (before any adapted version answered)
    whose label differs from CAMA as served: the same model, other importance-sampling noise."""
    later = [first for version, first in record["first_answer_by_version"].items() if version != "1"]
    stop = min(later, default=len(served))
    return float((served[:stop] != answered[:stop]).mean())


def service_summary(run: ServiceRun) -> dict[str, Any]:
    """The service's side of one stream: rate, time, jobs (with the requests each missed), and
    where along the stream each version first answered."""
    first = {str(int(v)): int(np.flatnonzero(run.versions == v).min()) for v in np.unique(run.versions)}
    lag = run.sent - run.starts / run.rate
    return {
        "rate_images_per_s": run.rate,
        "seconds": run.seconds,
        "requests": len(run.starts),
        "max_send_lag_s": float(lag.max()),
        "fresh_process": run.fresh_process,
        "jobs": describe_jobs(run),
        "first_answer_by_version": first,
        "median_latency_s": float(np.median(run.answered - run.sent)),
    }


if __name__ == "__main__":
    main()

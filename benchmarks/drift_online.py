"""alibi-detect's online drift detectors on the drift benchmark's streams, beside the service's test.

    python -m benchmarks.drift                        # first: writes the streams' inputs
    python -m benchmarks.drift_online                 # needs the bench extra (alibi-detect)

Each detector watches one representation of each request: the penultimate activations (512) or
the maximum softmax probability of the DNN trained with the generic manipulations
(``models/mnist_dnn_generic.pt``), or the mean of CAMA's q(m|x) (``dim_m``), as
``python -m benchmarks.drift`` saved them in ``.cache/drift/streams_mnistc.npz``. The reference
is the serving data's canary (the clean images the service calibrates its unusual score on);
the streams are the benchmark's: shuffled clean MNIST test images for the false alarms, and clean
images followed by each MNIST-C corruption for the requests to alarm.

- ``mmd``: ``MMDDriftOnline`` (Gaussian RBF kernel, median-heuristic bandwidth);
- ``lsdd``: ``LSDDDriftOnline``;
- ``cvm``: ``CVMDriftOnline``, the univariate Cramér-von Mises test (the online counterpart of
  a KS test) on the DNN's maximum softmax probability (``dnn_msp``). On several dimensions it
  corrects its false-alarm rate per dimension, which needs that many times more simulated
  streams.

The detectors and the service's test are compared at one expected run time between false alarms
(``--ert`` requests). The service's test alarms when ``z >= alarm_z``, which a clean request does
with probability ``P(N(0, 1) >= alarm_z)`` (:mod:`cama.drift`), so its ERT is at least
``1 / P(N(0, 1) >= alarm_z)``: 3.5 million requests at the service's ``alarm_z = 5``.
alibi-detect cannot be configured to that: it sets each threshold to the ``(1 - 1/ERT)``-quantile
of statistics simulated on ``--bootstraps`` reference streams and refuses fewer simulations than
the ERT, and millions of simulated streams are out of reach here. So every detector is configured
to ``--ert``, and the service's test is run on the same streams at ``alarm_z = z_(1 - 1/ERT)``
(``cama_test``), beside its figures at the service's setting (``python -m benchmarks.drift``).

For each detector: ``requests_to_alarm`` as the service's test is measured (a window of clean
requests, then the corruption, requests after the switch until the alarm, ``--horizon`` + 1 when
none), its median over the corruptions, and ``false_alarms_per_10k`` on ``--clean-streams``
shuffled passes over the clean images (the detector reset after each alarm). Writes
``benchmarks/results/drift_online.json`` and the keys ``drift.detect.<detector>.requests_to_alarm
.median`` and ``drift.detect.<detector>.false_alarms_per_10k`` in ``docs/results/metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import norm

from benchmarks.drift_stream import alarms_on
from benchmarks.drift_stream import requests_to_alarm as stream_requests_to_alarm
from cama.drift import DriftConfig
from training.metrics import update_metrics

STREAMS = Path(".cache/drift/streams_mnistc.npz")
RESULTS = Path("benchmarks/results")
# detector -> (alibi-detect method, representation in the streams file)
DETECTORS: dict[str, tuple[str, str]] = {
    "mmd_dnn": ("mmd", "dnn"),
    "lsdd_dnn": ("lsdd", "dnn"),
    "cvm_dnn": ("cvm", "dnn_msp"),
    "mmd_m": ("mmd", "m"),
    "lsdd_m": ("lsdd", "m"),
}
CAMA_TEST = "cama_test"  # the service's drift test on the unusual score, at the common ERT


def service_ert(alarm_z: float) -> float:
    """The service test's expected run time between false alarms, ``1 / P(N(0, 1) >= alarm_z)``."""
    return float(1.0 / norm.sf(alarm_z))


def cama_test(
    streams: dict[str, np.ndarray], sets: list[str], args: argparse.Namespace, ert: float
) -> dict[str, Any]:
    """The service's drift test on the service's unusual score, at ``alarm_z = z_(1 - 1/ERT)``."""
    alarm_z = float(norm.isf(1.0 / ert))
    config = DriftConfig(args.window, alarm_z, min(DriftConfig().clear_z, alarm_z - 1.0))
    rng = np.random.default_rng(0)
    clean = streams["clean/unusual"]
    alarms = sum(alarms_on(clean[rng.permutation(len(clean))], config) for _ in range(args.clean_streams))
    per_10k = alarms * 10000 / (args.clean_streams * len(clean))
    rta = {
        s: float(
            stream_requests_to_alarm(
                clean[rng.permutation(len(clean))], streams[f"{s}/unusual"], config, args.horizon
            )
        )
        for s in sets
    }
    median = float(np.median(list(rta.values())))
    print(
        f"{CAMA_TEST:9s} median requests to alarm {median:g}; false alarms per 10k {per_10k:.2f} "
        f"({alarms} in {args.clean_streams * len(clean)}); alarm_z {alarm_z:.2f}",
        flush=True,
    )
    return {
        "alarm_z": alarm_z,
        "false_alarms": alarms,
        "false_alarms_per_10k": per_10k,
        "requests_to_alarm": rta,
        "requests_to_alarm_median": median,
    }


def build(method: str, x_ref: np.ndarray, ert: float, window: int, bootstraps: int) -> Any:
    """An alibi-detect online detector on ``x_ref`` (torch backend where it has one)."""
    from alibi_detect.cd import CVMDriftOnline, LSDDDriftOnline, MMDDriftOnline

    common = {"ert": ert, "window_size": window, "n_bootstraps": bootstraps, "verbose": False}
    if method == "mmd":
        return MMDDriftOnline(x_ref, backend="pytorch", device="cpu", **common)
    if method == "lsdd":
        return LSDDDriftOnline(x_ref, backend="pytorch", device="cpu", **common)
    if method == "cvm":
        return CVMDriftOnline(x_ref, ert=ert, window_sizes=[window], n_bootstraps=bootstraps, verbose=False)
    raise ValueError(f"unknown detector method {method!r}")


def representation(streams: dict[str, np.ndarray], prefix: str, name: str) -> np.ndarray:
    """The ``(N, D)`` inputs of a detector: a stored representation, or ``dnn_msp``, the largest
    softmax output."""
    if name == "dnn_msp":
        return np.asarray(streams[f"{prefix}/dnn_softmax"].max(axis=1, keepdims=True))
    return streams[f"{prefix}/{name}"]


def alarmed(detector: Any, x: np.ndarray) -> bool:
    return bool(detector.predict(x, return_test_stat=False)["data"]["is_drift"])


def false_alarms(detector: Any, clean: np.ndarray, streams: int, rng: np.random.Generator) -> int:
    """Alarms on ``streams`` shuffled passes over ``clean``, resetting the detector after each."""
    count = 0
    for _ in range(streams):
        detector.reset_state()
        for x in clean[rng.permutation(len(clean))]:
            if alarmed(detector, x):
                count += 1
                detector.reset_state()
    return count


def requests_to_alarm(
    detector: Any, clean: np.ndarray, shifted: np.ndarray, window: int, horizon: int
) -> int:
    """A window of clean requests (restarted after any alarm there), then the shifted stream:
    requests after the switch until the alarm."""
    detector.reset_state()
    for x in clean[:window]:
        if alarmed(detector, x):
            detector.reset_state()
    for i, x in enumerate(shifted[:horizon]):
        if alarmed(detector, x):
            return i + 1
    return horizon + 1


def run_detector(
    name: str, streams: dict[str, np.ndarray], sets: list[str], args: argparse.Namespace, ert: float
) -> dict[str, Any]:
    method, watched = DETECTORS[name]
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    detector = build(method, representation(streams, "ref", watched), ert, args.window, args.bootstraps)
    configured = time.perf_counter() - started
    clean = representation(streams, "clean", watched)
    alarms = false_alarms(detector, clean, args.clean_streams, rng)
    per_10k = alarms * 10000 / (args.clean_streams * len(clean))
    rta = {
        s: float(
            requests_to_alarm(
                detector,
                clean[rng.permutation(len(clean))],
                representation(streams, s, watched),
                args.window,
                args.horizon,
            )
        )
        for s in sets
    }
    median = float(np.median(list(rta.values())))
    print(
        f"{name:9s} median requests to alarm {median:g}; false alarms per 10k {per_10k:.2f} "
        f"({alarms} in {args.clean_streams * len(clean)}); configured in {configured:.0f} s, "
        f"all in {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    return {
        "method": method,
        "representation": watched,
        "dims": int(clean.shape[1]),
        "false_alarms": alarms,
        "false_alarms_per_10k": per_10k,
        "requests_to_alarm": rta,
        "requests_to_alarm_median": median,
        "configure_seconds": configured,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=Path, default=STREAMS)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--detectors", default=",".join(DETECTORS), help=f"comma-separated, of {list(DETECTORS)}"
    )
    parser.add_argument("--ert", type=float, default=1000.0, help="expected run time (requests)")
    parser.add_argument("--window", type=int, default=None, help="default: the service test's window")
    parser.add_argument("--bootstraps", type=int, default=2000, help="simulated streams per detector")
    parser.add_argument("--clean-streams", type=int, default=5, help="shuffled clean passes")
    parser.add_argument("--horizon", type=int, default=1000, help="requests after a switch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-metrics", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [d for d in args.detectors.split(",") if d]
    if unknown := set(names) - set(DETECTORS):
        parser.error(f"unknown detectors {sorted(unknown)}")
    service = json.loads((args.results_dir / "drift.json").read_text())
    args.window = args.window or int(service["drift"]["window"])
    ert = args.ert
    with np.load(args.streams) as held:
        streams = {key: np.asarray(held[key], dtype=np.float32) for key in held.files}
    sets = list(service["sets"])
    print(
        f"ERT {ert:g} requests (the service's test: {service_ert(service['drift']['alarm_z']):.3g}), "
        f"window {args.window}, {args.bootstraps} bootstraps",
        flush=True,
    )
    torch.manual_seed(0)
    np.random.seed(0)  # CVMDriftOnline simulates with numpy's global generator
    report: dict[str, Any] = {
        "ert": ert,
        "service_ert": service_ert(service["drift"]["alarm_z"]),
        "alarm_z": service["drift"]["alarm_z"],
        "window": args.window,
        "bootstraps": args.bootstraps,
        "clean_streams": args.clean_streams,
        "horizon": args.horizon,
        "service": {
            "rule": service["rule"],
            "requests_to_alarm_median": service["requests_to_alarm_median"],
            "false_alarms_per_10k": service["false_alarms_per_10k"],
        },
        "detectors": {},
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / "drift_online.json"
    if path.exists():  # keep the detectors this run does not measure, if measured at the same setting
        old = json.loads(path.read_text())
        if all(old.get(k) == report[k] for k in ("ert", "window", "bootstraps", "clean_streams", "horizon")):
            report["detectors"] = old.get("detectors", {})
    for name in [CAMA_TEST, *names]:  # written after each, so a stopped run keeps what it measured
        if name == CAMA_TEST:
            report["detectors"][name] = cama_test(streams, sets, args, ert)
        else:
            report["detectors"][name] = run_detector(name, streams, sets, args, ert)
        path.write_text(json.dumps(report, indent=2) + "\n")
        if not args.no_metrics:
            r = report["detectors"][name]
            update_metrics(
                {
                    "drift.detect.ert": ert,
                    f"drift.detect.{name}.requests_to_alarm.median": r["requests_to_alarm_median"],
                    f"drift.detect.{name}.false_alarms_per_10k": r["false_alarms_per_10k"],
                }
            )


if __name__ == "__main__":
    main()

"""Write ``docs/results/drift.md`` from the drift benchmarks' results.

    python -m benchmarks.drift_report

Reads ``benchmarks/results/drift.json`` (MNIST-C), ``drift_val.json`` (the validation suite) and,
where present, ``drift_online.json`` (alibi-detect's online detectors), all written by the
commands the page names.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.drift_online import DETECTORS

RESULTS = Path("benchmarks/results")
PAGE = Path("docs/results/drift.md")
SCORE_NAMES = {
    "msp_dnn_generic": "max softmax, DNN (generic manipulations)",
    "energy_dnn_generic": "energy, DNN (generic manipulations)",
    "msp_bncnn_flat": "max softmax, BN-CNN (dense head)",
    "energy_bncnn_flat": "energy, BN-CNN (dense head)",
    "log_px": "CAMA -log p(x)",
    "log_px_complexity": "CAMA -log p(x), complexity-corrected",
    "log_px_ratio": "CAMA -log p(x), likelihood ratio to a background",
}

INTRO = """# The unusual score and the drift alarm beside common detectors

Written by `python -m benchmarks.drift_report` from the results of the commands below.

## Protocol

- **Per-input scores** (`python -m benchmarks.drift`): every score separates 1,000 images of each
  of MNIST-C's 15 corruptions (a fixed draw, the same indices for every corruption) from the 10,000
  clean MNIST test images; the figure is the AUROC (1: perfectly, 0.5: not at all). CAMA's scores
  come from the path `POST /predict` serves (ONNX Runtime, the first-sample screen, K = 10), the
  service's rules (`cama.novelty`) calibrated on the serving data's canary as the service
  calibrates them. Beside them: the maximum softmax probability and the energy score
  (`-logsumexp` of the logits) of the DNN trained with the generic manipulations
  (`models/mnist_dnn_generic.pt`) and of the dense-head BN-CNN (`models/mnist_bncnn_flat.pt`);
  CAMA's `-log p(x)` raw, corrected by input complexity (Serrà et al., 2020: `S(x) = -log2 p(x) -
  L(x)`, `L(x)` the zlib code length in bits of the image's 8-bit levels), and as a likelihood ratio
  to a background model (Ren et al., 2019; here a product of per-pixel Bernoullis fitted on
  training images with {mutation:.0%} of their pixels replaced by noise, not a second copy of the
  model). Higher is more unusual for every score. CAMA's `log p(x)` is the Bernoulli likelihood
  of grey levels in [0, 1] that it is trained with: a density, not a code length over the 256
  levels the compressor codes, so the two terms of `S(x)` are not in the same units (the
  correction assumes they are).
- **Choosing the service's rule** (`python -m benchmarks.drift --suite validation`): the same
  measurement on the validation suite (the 7 manipulations of `training.manipulations` the
  evaluation CLIs validate on, and uniform noise, applied to held-out images of MNIST's training
  set that are not in the canary). The service's rule is the rule with the best mean AUROC there;
  MNIST-C never chooses anything.
- **Streams** (`python -m benchmarks.drift` for the service's test; `python -m
  benchmarks.drift_online` for alibi-detect's online detectors): a stream of clean requests that
  switches to a corruption, requests after the switch until the alarm (horizon {horizon}; a stream
  that never alarms counts {horizon_plus}), the median over the 15 corruptions; and alarms per
  10,000 requests on shuffled streams of the clean test images.

alibi-detect (the `bench` extra) pins `numpy<2`, `pandas<3` and `Pillow<11`, which the service's
environment does not hold, so its benchmark runs in a virtual environment of its own:

```sh
python3 -m venv venv-bench
venv-bench/bin/pip install torch==2.13.0 'alibi-detect[torch]==0.13.0'
python -m benchmarks.drift                                    # the service's env: writes the streams
python -m benchmarks.drift --sections baselines               # or without CAMA's log p(x): the
                                                              # baselines' scores and the streams
PYTHONPATH=$PWD venv-bench/bin/python -m benchmarks.drift_online
python -m benchmarks.drift_report                             # this page
```
"""


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def per_input_section(title: str, report: dict[str, Any], baselines: dict[str, Any] | None) -> str:
    """Mean AUROC by score, then AUROC by set for each score; the baselines section's scores
    (``drift_baselines[_val].json``) fill in what the scores section's report lacks."""
    report = dict(report)
    scores = dict(report.get("auroc_mean_by_score", {}))
    by_score = dict(report.get("auroc_by_score", {}))
    extra: dict[str, Any] = baselines or {}
    for name, mean in extra.get("auroc_mean_by_score", {}).items():
        if name not in scores:
            scores[name] = mean
            by_score[name] = extra["auroc_by_score"][name]
    report["auroc_by_score"] = by_score
    rules = report["auroc_mean_by_rule"]
    served = report["rule"]
    means = [
        [f"unusual, rule `{r}`" + (" (served)" if r == served else ""), f"{a:.3f}"] for r, a in rules.items()
    ]
    means += [[f"{SCORE_NAMES.get(s, s)} (`{s}`)", f"{a:.3f}"] for s, a in scores.items()]
    means.sort(key=lambda row: -float(row[1]))
    sets = list(report["auroc_by_rule"])
    header = ["set", *[f"`{r}`" for r in rules], *[f"`{s}`" for s in scores]]
    rows = []
    for name in sets:
        row = [name] + [f"{report['auroc_by_rule'][name][r]:.3f}" for r in rules]
        row += [f"{report['auroc_by_score'][s][name]:.3f}" for s in scores]
        rows.append(row)
    rows.append(
        ["**mean**", *[f"**{a:.3f}**" for a in rules.values()], *[f"**{a:.3f}**" for a in scores.values()]]
    )
    missing = [f"`{name}`" for name in SCORE_NAMES if name not in scores]
    note = (
        "Not measured in this suite's last run: " + ", ".join(missing) + " (they need the scores "
        "section's CAMA pass, `python -m benchmarks.drift --sections scores`)."
        if missing
        else ""
    )
    return "\n\n".join(
        [
            f"## {title}",
            table(["score", "mean AUROC"], means),
            *([note] if note else []),
            "AUROC by set (columns: the service's rules, then the other scores):",
            table(header, rows),
        ]
    )


def stream_section(service: dict[str, Any], online: dict[str, Any] | None) -> str:
    parts = [
        "## Streams",
        f"The service's test (`cama.drift`: window {service['drift']['window']}, alarm at "
        f"z >= {service['drift']['alarm_z']:g}) on its unusual score (rule `{service['rule']}`): median "
        f"requests to alarm **{service['requests_to_alarm_median']:g}**, "
        f"**{service['false_alarms_per_10k']:.2f}** false alarms per 10,000 clean requests "
        f"({service['false_alarms']} in {service['clean_images'] * 5:,}).",
    ]
    if online is None:
        parts.append("alibi-detect's detectors: not measured yet (`python -m benchmarks.drift_online`).")
        return "\n\n".join(parts)
    rows = []
    for name, r in online["detectors"].items():
        what = (
            "the service's test, `alarm_z` at this ERT"
            if name == "cama_test"
            else (
                f"`{r['method']}` on `{r['representation']}` ({r['dims']} dim{'s' if r['dims'] > 1 else ''})"
            )
        )
        rows.append(
            [f"`{name}`", what, f"{r['requests_to_alarm_median']:g}", f"{r['false_alarms_per_10k']:.2f}"]
        )
    parts += [
        f"At a common expected run time between false alarms of {online['ert']:g} requests (the "
        f"service's own setting has an ERT of at least {online['service_ert']:.3g}, which alibi-detect "
        f"cannot be configured to: see `benchmarks/drift_online.py`), window {online['window']}, "
        f"{online['bootstraps']} simulated streams per detector, {online['clean_streams']} shuffled "
        f"pass{'es' if online['clean_streams'] > 1 else ''} over the clean images:",
        table(["detector", "watches", "median requests to alarm", "false alarms per 10k"], rows),
    ]
    if missing := [f"`{name}`" for name in DETECTORS if name not in online["detectors"]]:
        parts.append("Not measured in the last run: " + ", ".join(missing) + ".")
    by_set = [
        [name, *[f"{r['requests_to_alarm'][s]:g}" for s in r["requests_to_alarm"]]]
        for name, r in online["detectors"].items()
    ]
    first = next(iter(online["detectors"].values()))
    parts += [
        "Requests to alarm by corruption:",
        table(["detector", *list(first["requests_to_alarm"])], by_set),
    ]
    return "\n\n".join(parts)


def targets_section(
    mnistc: dict[str, Any], baselines: dict[str, Any] | None, online: dict[str, Any] | None
) -> str:
    """The two targets, each read off the figures above: met or not."""
    served = mnistc["auroc_mean"]
    others = {f"rule `{r}`": a for r, a in mnistc["auroc_mean_by_rule"].items() if r != mnistc["rule"]}
    scores = dict(mnistc.get("auroc_mean_by_score", {}))
    scores |= {k: v for k, v in (baselines or {}).get("auroc_mean_by_score", {}).items() if k not in scores}
    others |= {f"`{s}`": a for s, a in scores.items()}
    best_name, best = max(others.items(), key=lambda item: item[1])
    lines = [
        "## Targets",
        f"- The served rule's mean AUROC on MNIST-C, {served:.3f}, against the best other per-input "
        f"score measured there ({best_name}, {best:.3f}): "
        + ("met." if served >= best else "not met.")
        + f" Against 0.93: {'met' if served >= 0.93 else 'not met'}.",
    ]
    if online is not None:
        cama = online["detectors"].get("cama_test")
        rivals = {n: r for n, r in online["detectors"].items() if n != "cama_test"}
        if cama is not None and rivals:
            name, rival = min(
                rivals.items(),
                key=lambda item: (item[1]["requests_to_alarm_median"], item[1]["false_alarms_per_10k"]),
            )
            met = (
                cama["requests_to_alarm_median"] <= rival["requests_to_alarm_median"]
                and cama["false_alarms_per_10k"] <= rival["false_alarms_per_10k"]
            )
            lines.append(
                f"- At the common ERT, the service's test alarms after a median of "
                f"{cama['requests_to_alarm_median']:g} requests with {cama['false_alarms_per_10k']:.2f} "
                f"false alarms per 10k; the fastest alibi-detect detector, `{name}`, after "
                f"{rival['requests_to_alarm_median']:g} with "
                f"{rival['false_alarms_per_10k']:.2f}: " + ("met." if met else "not met.")
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--page", type=Path, default=PAGE)
    args = parser.parse_args(argv)
    mnistc = json.loads((args.results_dir / "drift.json").read_text())
    validation = json.loads((args.results_dir / "drift_val.json").read_text())
    extra = {
        name: json.loads(path.read_text()) if (path := args.results_dir / f"{name}.json").exists() else None
        for name in ("drift_baselines", "drift_baselines_val")
    }
    online_path = args.results_dir / "drift_online.json"
    online = json.loads(online_path.read_text()) if online_path.exists() else None
    page = [
        INTRO.format(
            mutation=mnistc.get("background_mutation", 0.2),
            horizon=mnistc["horizon"],
            horizon_plus=mnistc["horizon"] + 1,
        ).rstrip(),
        per_input_section("Per-input scores on MNIST-C", mnistc, extra["drift_baselines"]),
        per_input_section(
            "The validation suite (chooses the service's rule)", validation, extra["drift_baselines_val"]
        ),
        stream_section(mnistc, online),
        targets_section(mnistc, extra["drift_baselines"], online),
    ]
    args.page.write_text("\n\n".join(page) + "\n")
    print(f"wrote {args.page}")


if __name__ == "__main__":
    main()

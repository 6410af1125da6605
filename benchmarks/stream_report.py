"""The page and the plot of ``python -m benchmarks.streams``: tables from its JSON report, the
sentences saying where each method wins and whether each target is met, written from the numbers."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

NAMES = {
    "dnn_generic": "DNN (generic manipulations)",
    "bn_adapt": "BN adaptation",
    "tent_online": "TENT online",
    "sar": "SAR",
    "cama": "CAMA as served",
    "cama_service": "CAMA through the service",
}
STYLES = {"tent_online": "--", "sar": ":"}  # both often on top of BN adaptation
COLOURS = {
    "dnn_generic": "tab:gray",
    "bn_adapt": "tab:olive",
    "tent_online": "tab:orange",
    "sar": "tab:red",
    "cama": "tab:blue",
    "cama_service": "tab:green",
}
DESCRIBE = {
    "iid": "per corruption, random order, batches of 100 (the reference)",
    "label_shift": "per corruption, class proportions from Dirichlet(0.1) along the stream",
    "class_sorted": "per corruption, sorted by class",
    "batch1": "per corruption, random order, batches of 1",
    "batch4": "per corruption, random order, batches of 4",
    "batch16": "per corruption, random order, batches of 16",
    "mixed": "all 15 corruptions shuffled into one stream",
    "continual": "clean, the 15 corruptions one after another, clean again",
}


def _acc(results: Mapping[str, Any], protocol: str, method: str) -> float | None:
    summary = results.get(protocol, {}).get(method)
    return None if summary is None else float(summary["accuracy"])


def main_table(results: Mapping[str, Any], methods: list[str], streams: Mapping[str, Any]) -> list[str]:
    lines = [
        "| protocol | images | " + " | ".join(NAMES[m] for m in methods) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in methods) + " |",
    ]
    for protocol, by_method in results.items():
        values = {m: by_method[m]["accuracy"] for m in methods if m in by_method}
        best = max(values.values())
        n = streams[protocol]["images"]
        cells = [
            f"**{values[m]:.3f}**" if values[m] == best else f"{values[m]:.3f}"
            for m in methods
            if m in values
        ]
        lines.append(f"| `{protocol}` | {n} | " + " | ".join(cells) + " |")
    return lines


def wins(results: Mapping[str, Any], methods: list[str]) -> list[str]:
    """One sentence per protocol: the method ahead, and by how much."""
    lines = []
    for protocol, by_method in results.items():
        ranked = sorted(((by_method[m]["accuracy"], m) for m in methods if m in by_method), reverse=True)
        (a1, m1), (a2, m2) = ranked[0], ranked[1]
        last_a, last_m = ranked[-1]
        lines.append(
            f"- `{protocol}` ({DESCRIBE[protocol]}): {NAMES[m1]} is ahead ({a1:.3f}), "
            f"{100 * (a1 - a2):.1f} points above {NAMES[m2]} ({a2:.3f}); "
            f"last is {NAMES[last_m]} ({last_a:.3f})."
        )
    return lines


def step_size_effect(results: Mapping[str, Any]) -> str:
    """How far TENT and SAR move from BN adaptation (the same network, no step) on these streams."""
    gaps = [
        abs(by[m]["accuracy"] - by["bn_adapt"]["accuracy"])
        for by in results.values()
        if "bn_adapt" in by
        for m in ("tent_online", "sar")
        if m in by
    ]
    if not gaps:
        return ""
    return (
        f"TENT and SAR end within {100 * max(gaps):.1f} points of BN adaptation on every protocol: "
        "on streams this short their steps change few answers (the validation table shows the same "
        "for every step size), so what separates the BN-CNN rows from the others is the batch "
        "statistics they all share."
    )


def targets(results: Mapping[str, Any], service: Mapping[str, Any]) -> list[str]:
    """Each target of the benchmark, met or not, with the numbers."""
    lines = []

    def ahead(protocol: str, others: tuple[str, ...]) -> None:
        s = _acc(results, protocol, "cama_service")
        if s is None:
            return
        for other in others:
            o = _acc(results, protocol, other)
            if o is None:
                continue
            verdict = "met" if s > o else "not met"
            lines.append(
                f"- `{protocol}`: CAMA through the service {s:.3f} ahead of {NAMES[other]} {o:.3f}: {verdict}"
            )

    for protocol in ("mixed", "label_shift", "continual"):
        ahead(protocol, ("tent_online", "sar"))
    ahead("batch1", ("bn_adapt", "dnn_generic"))
    behind = [
        p for p in results if _acc(results, p, "cama_service") is not None and _acc(results, p, "dnn_generic")
    ]
    beaten = [p for p in behind if _acc(results, p, "cama_service") <= _acc(results, p, "dnn_generic")]  # type: ignore[operator]
    lines.append(
        "- ahead of the DNN (generic manipulations) on every protocol: "
        + (
            "met"
            if not beaten
            else "not met (behind or level on " + ", ".join(f"`{p}`" for p in beaten) + ")"
        )
    )
    cont = results.get("continual", {}).get("cama_service")
    if cont is not None:
        start, end = cont["parts"]["clean_start"], cont["parts"]["clean_end"]
        verdict = "met" if end >= start - 0.005 else "not met"
        lines.append(
            f"- `continual`: clean accuracy at the end {end:.3f}, at the start {start:.3f}: {verdict}"
        )
    below = []
    for protocol in results:
        s, c = _acc(results, protocol, "cama_service"), _acc(results, protocol, "cama")
        if s is not None and c is not None and s < c - 0.005:
            rec = service.get(protocol, {})
            note = ""
            if set(rec.get("first_answer_by_version", {})) == {"1"}:
                note = (
                    f", v1 answered every image: importance-sampling noise, "
                    f"{100 * rec.get('v1_disagreement', float('nan')):.0f}% of the labels differ"
                )
            below.append(f"`{protocol}` ({s:.3f} against {c:.3f}{note})")
    lines.append(
        "- no protocol where CAMA through the service is more than 0.5 point below CAMA as served: "
        + ("met" if not below else "not met: " + ", ".join(below))
    )
    return lines


def parts_table(results: Mapping[str, Any], protocols: list[str], methods: list[str]) -> list[str]:
    lines = [
        "| protocol | part | " + " | ".join(NAMES[m] for m in methods) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in methods) + " |",
    ]
    for protocol in protocols:
        by_method = results.get(protocol)
        if not by_method:
            continue
        parts = next(iter(by_method.values()))["parts"]
        for part in parts:
            cells = [f"{by_method[m]['parts'][part]:.3f}" if m in by_method else "" for m in methods]
            lines.append(f"| `{protocol}` | {part} | " + " | ".join(cells) + " |")
    return lines


def service_summary(service: Mapping[str, Any]) -> str:
    """How many jobs started, how many published a version while their stream lasted."""
    jobs = [j for s in service.values() for j in s["jobs"]]
    landed = sum(1 for s in service.values() for v in s["first_answer_by_version"] if v != "1")
    running = sum(1 for j in jobs if j["finished_s"] is None)
    took = [j["finished_s"] - j["created_s"] for j in jobs if j["finished_s"] is not None]
    text = (
        f"Over the {len(service)} streams the service started {len(jobs)} adaptation jobs; "
        f"{landed} of them published a version that answered before its stream ended, "
        f"{running} were still running when their stream ended"
    )
    if took:
        text += f"; the jobs that ended took {min(took):.0f} to {max(took):.0f} s"
    return text + "."


def service_table(service: Mapping[str, Any]) -> list[str]:
    lines = [
        "| protocol | requests | seconds | median latency (s) | labels unlike CAMA as served, v1 "
        "| jobs: state, inputs, started -> ended (s into the stream), requests missed |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for protocol, s in service.items():
        jobs = "; ".join(
            f"{j['state']}, {j['inputs']}, {j['created_s']:.0f} -> "
            + ("running at the end" if j["finished_s"] is None else f"{j['finished_s']:.0f}")
            + (", published nothing" if j["requests_missed"] < 0 else f", missed {j['requests_missed']}")
            for j in s["jobs"]
        )
        lines.append(
            f"| `{protocol}` | {s['requests']} | {s['seconds']:.0f} | {s['median_latency_s']:.2f} "
            f"| {100 * s.get('v1_disagreement', float('nan')):.1f}% | {jobs or 'none started'} |"
        )
    return lines


def validation_table(validation: Mapping[str, Any], chosen: Mapping[str, Mapping[str, str]]) -> list[str]:
    lines: list[str] = []
    for method, table in validation.items():
        protocols = list(next(iter(table.values())))
        lines += [
            "",
            f"{NAMES[method]} (bold: the setting chosen for that protocol):",
            "",
            "| setting | " + " | ".join(f"`{p}`" for p in protocols) + " |",
            "| --- | " + " | ".join("---:" for _ in protocols) + " |",
        ]
        for cid, row in table.items():
            cells = [
                f"**{row[p]:.3f}**" if chosen.get(method, {}).get(p) == cid else f"{row[p]:.3f}"
                for p in protocols
            ]
            lines.append(f"| {cid} | " + " | ".join(cells) + " |")
    return lines


def plot(report: Mapping[str, Any], path: Path) -> None:
    results = report["results"]
    protocols = list(results)
    cols = 4
    rows = -(-len(protocols) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, protocol in zip(axes.flat, protocols, strict=False):
        for method, summary in results[protocol].items():
            curve = summary["curve"]
            window = report["curve_window"]
            xs = [window * (i + 0.5) for i in range(len(curve))]
            style = STYLES.get(method, "-")
            ax.plot(xs, curve, style, label=NAMES[method], color=COLOURS[method], lw=1.2, marker=".", ms=3)
        service = report.get("service", {}).get(protocol)
        if service:
            for version, first in service["first_answer_by_version"].items():
                if version != "1":
                    ax.axvline(first, color=COLOURS["cama_service"], ls=":", lw=1)
        ax.set_title(f"{protocol}", fontsize=10)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("images into the stream", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(protocols) :]:
        ax.axis("off")
    axes[0][0].set_ylabel(f"accuracy (windows of {report['curve_window']})", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: Mapping[str, Any], md: Path, png: Path) -> None:
    """``streams.md`` and ``streams.png`` from the report of ``python -m benchmarks.streams``."""
    results = report["results"]
    methods = [m for m in NAMES if any(m in by for by in results.values())]
    sizes = report["sizes"]
    per_source = ", ".join(report["per_source_corruptions"])
    text = [
        "# Adaptation on streams: mixed corruptions, label shift, small batches, one after another",
        "",
        f"`{report['command']}` ({report['seconds'] / 60:.0f} minutes on 2 shared CPU cores) writes "
        "this page, `streams.png`, `benchmarks/results/streams.json` and the `stream.*` keys of "
        "`metrics.json`. "
        "The i.i.d. MNIST-C protocol of every method is in [mnistc.md](mnistc.md); this page changes the "
        "order and the size of the batches the same images arrive in.",
        "",
        "Streams (seeded, the same for every method; `training.streams`):",
        "",
        f"- per-corruption protocols (`iid`, `label_shift`, `class_sorted`, `batch1`, `batch4`, `batch16`): "
        f"{sizes['per_source']} test images of each of {per_source}, one after another; the BN-CNN methods "
        "restart from the trained network at each corruption (they are told where one begins);",
        f"- `mixed`: {sizes['whole']} images of each of the 15 MNIST-C corruptions, shuffled into one "
        "stream;",
        f"- `continual`: {sizes['clean']} clean images, {sizes['whole']} of each of the 15 corruptions in "
        "MNIST-C's order, then the same clean images again; nothing restarts.",
        "",
        "Methods:",
        "",
        "- DNN (generic manipulations): `models/mnist_dnn_generic.pt`, no adaptation;",
        "- BN adaptation: the dense-head BN-CNN (`models/mnist_bncnn_flat.pt`) with BatchNorm on each "
        "batch's statistics;",
        "- TENT online: `training.tent` on the same network, one Adam step per batch;",
        "- SAR: `training.sar` on the same network (Niu et al. 2023: entropy filter, sharpness-aware "
        "step, model recovery), one SGD step per batch;",
        "- CAMA as served: the label `POST /predict`'s path gives (ONNX Runtime, first-sample screen, "
        "K = 10), not adapted;",
        "- CAMA through the service: the running service in auto-adapt mode "
        "(`CAMA_AUTO_ADAPT=mnist`, `CAMA_AUTO_ADAPT_COOLDOWN_S=0`, every other setting at its default); "
        "each batch is one `/predict` request, sent at a fixed "
        f"**{report['rate_images_per_s']:g} images per second** whether or not earlier requests were "
        "answered, and each image is scored by the label the service answered then. The service "
        "raises drift, starts jobs on the unusual inputs it kept, its gate decides and an accepted "
        "version is swapped in, as for any user. Between protocols (never within one) it is brought "
        "back to its start: open jobs cancelled, v1 activated again, 100 clean images to warm its "
        "drift test up.",
        "",
        "TENT's and SAR's settings are chosen per protocol on the validation suite (below), never on "
        "MNIST-C.",
        "",
        "## Mean online accuracy",
        "",
        *main_table(results, methods, report["streams"]),
        "",
        "![accuracy along each stream](streams.png)",
        "",
        f"Accuracy over windows of {report['curve_window']} images along each stream; dotted lines "
        "mark where an adapted version of the service first answered.",
        "",
        "## Where each method wins",
        "",
        *wins(results, methods),
        "",
        step_size_effect(results),
        "",
        "## Targets",
        "",
        *targets(results, report.get("service", {})),
        "",
        "## The service's jobs",
        "",
        f"Rate {report['rate_images_per_s']:g} images per second. A job's requests missed are the "
        "requests sent after it took its inputs and answered before its version answered any (all "
        "of them to the end of the stream when its version never answered). The labels unlike CAMA "
        "as served are the share of the images v1 answered whose label differs from the CAMA as "
        "served row: the same model with other importance-sampling noise (each request draws its "
        "own), so how far the two rows can differ with no adaptation at all.",
        "",
        service_summary(report.get("service", {})),
        "",
        *service_table(report.get("service", {})),
        "",
        "## Per corruption",
        "",
        *parts_table(results, list(results), methods),
        "",
        "## Validation: TENT's and SAR's settings",
        "",
        "The same protocols built from the validation split of MNIST's training set under "
        "`training.manipulations`' named manipulations (noise 0.3, contrast 0.4, salt-and-pepper 0.1, "
        "blur 1, rotation 30, vertical and horizontal shift 0.3; "
        f"{report['validation_sizes']['per_source']} images of each in the per-source protocols, which "
        "run the seven one after another without a restart so that a setting is judged over several "
        f"batches; {report['validation_small_batch']} of each in `batch1` and `batch4`; "
        f"{report['validation_sizes']['whole']} of each in `mixed` and `continual`), mean online "
        "accuracy; SAR's `margin` is the factor of ln C in its entropy margin. Each protocol on MNIST-C "
        "uses the setting with the best accuracy on the same protocol here (the first listed on a tie).",
        *validation_table(report.get("validation", {}), report.get("chosen", {})),
        "",
    ]
    md.write_text("\n".join(text))
    plot(report, png)

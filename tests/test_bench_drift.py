"""The drift benchmark's stream comparison (benchmarks.drift_online, without alibi-detect) and its
page (benchmarks.drift_report), on tiny made-up results."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.drift_online import cama_test, service_ert
from benchmarks.drift_report import main as write_page


def test_the_service_ert_is_the_inverse_normal_tail():
    assert abs(service_ert(5.0) - 1 / 2.8665e-7) / service_ert(5.0) < 1e-3
    assert service_ert(3.0) < service_ert(4.0)


def test_the_service_test_at_a_common_ert_alarms_on_a_shift_and_rarely_on_clean():
    rng = np.random.default_rng(0)
    streams = {
        "clean/unusual": rng.random(5000),
        "shifted/unusual": 0.6 + 0.4 * rng.random(300),
        "same/unusual": rng.random(300),
    }
    args = argparse.Namespace(window=100, clean_streams=2, horizon=200)
    out = cama_test(streams, ["shifted", "same"], args, ert=1e5)
    assert abs(out["alarm_z"] - 4.265) < 0.01  # z_(1 - 1e-5)
    assert out["false_alarms"] == 0
    assert out["requests_to_alarm"]["shifted"] < 60
    assert out["requests_to_alarm"]["same"] == 201  # never: horizon + 1


def report(rule_means: dict[str, float], sets: list[str]) -> dict[str, object]:
    return {
        "rule": "m_class",
        "auroc_mean": rule_means["m_class"],
        "auroc_mean_by_rule": rule_means,
        "auroc_by_rule": {s: dict(rule_means) for s in sets},
        "horizon": 1000,
        "drift": {"window": 100, "alarm_z": 5.0},
        "requests_to_alarm_median": 30.0,
        "false_alarms_per_10k": 0.0,
        "false_alarms": 0,
        "clean_images": 10000,
    }


def test_the_page_names_each_score_and_reads_the_targets_off_the_figures(tmp_path: Path):
    sets = ["a", "b"]
    (tmp_path / "drift.json").write_text(json.dumps(report({"evidence": 0.8, "m_class": 0.94}, sets)))
    (tmp_path / "drift_val.json").write_text(json.dumps(report({"evidence": 0.7, "m_class": 0.95}, sets)))
    baselines = {
        "auroc_mean_by_score": {"msp_dnn_generic": 0.96},
        "auroc_by_score": {"msp_dnn_generic": {"a": 0.96, "b": 0.96}},
    }
    (tmp_path / "drift_baselines.json").write_text(json.dumps(baselines))
    detector = {
        "method": "mmd",
        "representation": "dnn",
        "dims": 512,
        "requests_to_alarm": {"a": 8.0, "b": 12.0},
    }
    online = {
        "ert": 500.0,
        "service_ert": 3.49e6,
        "window": 100,
        "bootstraps": 1000,
        "clean_streams": 1,
        "detectors": {
            "cama_test": {
                "requests_to_alarm": {"a": 9.0, "b": 11.0},
                "requests_to_alarm_median": 10.0,
                "false_alarms_per_10k": 1.0,
            },
            "mmd_dnn": detector | {"requests_to_alarm_median": 10.0, "false_alarms_per_10k": 3.0},
        },
    }
    (tmp_path / "drift_online.json").write_text(json.dumps(online))
    page = tmp_path / "drift.md"
    write_page(["--results-dir", str(tmp_path), "--page", str(page)])
    text = page.read_text()
    assert "| max softmax, DNN (generic manipulations) (`msp_dnn_generic`) | 0.960 |" in text
    assert "`log_px_complexity`" in text  # named as not measured
    # 0.94 is below the baseline's 0.96 (not met) and above 0.93 (met); the stream target is met
    assert "(`msp_dnn_generic`, 0.960): not met. Against 0.93: met." in text
    assert "`mmd_dnn`, after 10 with 3.00: met." in text
    online["detectors"]["mmd_dnn"]["false_alarms_per_10k"] = 0.5  # as fast, fewer false alarms
    (tmp_path / "drift_online.json").write_text(json.dumps(online))
    write_page(["--results-dir", str(tmp_path), "--page", str(page)])
    assert "`mmd_dnn`, after 10 with 0.50: not met." in page.read_text()

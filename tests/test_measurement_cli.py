"""Command-line entry points of the measurement CAMA, smoke-run with tiny models.

A CSV round trip runs as a user runs it (subprocesses): write a table and a schema, train from
it, predict from it. The other commands run in process with the cheapest settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cama.adapt import MEASUREMENT_RECIPE
from cama.checkpoint import load_checkpoint
from cama.measurement_model import MeasurementCama
from experiments import check_measurement_gate, evaluate_measurement, measurement_oracles
from training import measurement_training, train_measurement
from training.measurement_data import make_dataset, schema_dict, to_frame

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINTS = (
    "training.train_measurement",
    "experiments.evaluate_measurement",
    "experiments.check_measurement_gate",
    "experiments.measurement_oracles",
)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture
def table(tmp_path: Path) -> tuple[Path, Path, pd.DataFrame]:
    ds = make_dataset(0, n_train=80, n_val=0, n_test=40)
    train = to_frame(ds.train).rename(columns={"y": "label"})
    train["label"] = train["label"].map(lambda v: f"class_{v}")
    csv = tmp_path / "train.csv"
    train.to_csv(csv, index=False)
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({**schema_dict(), "target": "label"}))
    test = to_frame(ds.test).rename(columns={"y": "label"})
    test["label"] = test["label"].map(lambda v: f"class_{v}")
    return csv, schema, test


def test_csv_round_trip_from_the_command_line(tmp_path: Path, table: tuple[Path, Path, pd.DataFrame]) -> None:
    csv, schema, test = table
    out = tmp_path / "model.pt"
    proc = run(
        "training.train_measurement",
        "--csv",
        str(csv),
        "--schema",
        str(schema),
        "--out",
        str(out),
        "--tiny",
        "--epochs",
        "2",
        "--threads",
        "1",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["checkpoint"] == str(out)
    assert Path(summary["replay"]).exists()
    model, meta = load_checkpoint(out)
    assert isinstance(model, MeasurementCama)
    encoding = meta.provenance["encoding"]
    assert encoding["classes"] == [f"class_{i}" for i in range(5)]
    assert set(encoding["standardization"]["mean"]) == {f"a{i}" for i in range(1, 6)} | {
        f"c{i}" for i in range(1, 6)
    } | {f"x{i}" for i in range(1, 11)}
    replay = np.load(summary["replay"])
    assert replay["replay_x"].shape == (72, 10)
    assert replay["canary_y"].shape == (8,)

    test_csv = tmp_path / "new.csv"
    test.drop(columns=["label"]).to_csv(test_csv, index=False)
    pred_csv = tmp_path / "pred.csv"
    proc = run(
        "training.train_measurement",
        "predict",
        "--checkpoint",
        str(out),
        "--csv",
        str(test_csv),
        "--out",
        str(pred_csv),
        "--threads",
        "1",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    pred = pd.read_csv(pred_csv)
    assert len(pred) == 40
    assert set(pred["predicted"]) <= set(encoding["classes"])
    probs = pred[[f"prob_class_{i}" for i in range(5)]].to_numpy()
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)


def test_predict_applies_the_stored_standardisation_and_reports_accuracy(
    tmp_path: Path, table: tuple[Path, Path, pd.DataFrame], capsys: pytest.CaptureFixture[str]
) -> None:
    csv, schema, test = table
    out = tmp_path / "model.pt"
    assert (
        train_measurement.main(
            ["--csv", str(csv), "--schema", str(schema), "--out", str(out), "--tiny", "--epochs", "1"]
        )
        == 0
    )
    capsys.readouterr()
    parquet = tmp_path / "new.parquet"
    test.to_parquet(parquet)
    assert train_measurement.main(["predict", "--checkpoint", str(out), "--csv", str(parquet)]) == 0
    captured = capsys.readouterr()
    pred = pd.read_csv(pd.io.common.StringIO(captured.out))
    assert list(pred.columns[:2]) == ["label", "predicted"]
    summary = json.loads(captured.err.strip().splitlines()[-1])
    assert summary["rows"] == 40
    assert 0.0 <= summary["accuracy"] <= 1.0
    assert summary["accuracy"] == pytest.approx(float((pred["label"] == pred["predicted"]).mean()))
    # the same rows with shifted raw units give other inputs: the stored statistics are applied
    _, meta = load_checkpoint(out)
    encoding = measurement_training.load_encoding(meta.provenance)
    stats = encoding.standardizer
    encoded = encoding.encode(test)
    expected = (test["x3"].to_numpy() - stats.mean["x3"]) / stats.std["x3"]
    assert np.allclose(encoded.x[:, 2], expected, atol=1e-5)


def test_schema_from_flags_and_errors_exit_with_a_reason(
    tmp_path: Path, table: tuple[Path, Path, pd.DataFrame], capsys: pytest.CaptureFixture[str]
) -> None:
    csv, _, _ = table
    out = tmp_path / "flags.pt"
    flags = [
        "--target",
        "label",
        "--parents",
        "a1,a2,a3,a4,a5",
        "--coparents",
        "c1,c2,c3,c4,c5",
        "--children",
        ",".join(f"x{i}" for i in range(1, 11)),
    ]
    assert train_measurement.main(["--csv", str(csv), *flags, "--out", str(out), "--tiny", "--dry-run"]) == 0
    assert load_checkpoint(out)[1].provenance["encoding"]["schema"]["parents"] == [
        f"a{i}" for i in range(1, 6)
    ]
    capsys.readouterr()
    bad = [
        "--csv",
        str(csv),
        "--target",
        "label",
        "--children",
        "x1,nope",
        "--out",
        str(tmp_path / "b.pt"),
        "--tiny",
    ]
    assert train_measurement.main(bad) == 2
    error = json.loads(capsys.readouterr().err)["error"]
    assert error["reason"] == "missing_column"
    assert error["column"] == "nope"
    assert not (tmp_path / "b.pt").exists()


def test_synthetic_training_records_its_generator(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "synthetic.pt"
    assert (
        train_measurement.main(["--synthetic", "--seed", "3", "--out", str(out), "--tiny", "--dry-run"]) == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert load_checkpoint(out)[1].metrics["test_accuracy"] == result["test_accuracy"]
    _, meta = load_checkpoint(out)
    assert meta.provenance["generator_seed"] == 3
    assert meta.provenance["dataset"] == "synthetic-measurement"
    assert meta.provenance["replay_file"] == "synthetic.replay.npz"
    assert np.load(tmp_path / "synthetic.replay.npz")["replay_x"].shape == (450, 10)


def test_gate_check_runs_the_shipped_and_the_paper_recipe(
    tmp_path: Path, table: tuple[Path, Path, pd.DataFrame]
) -> None:
    out = tmp_path / "synthetic.pt"
    assert (
        train_measurement.main(["--synthetic", "--seed", "3", "--out", str(out), "--tiny", "--dry-run"]) == 0
    )
    _, meta = load_checkpoint(out)
    assert meta.provenance["adapt_recipe"] == MEASUREMENT_RECIPE.as_dict()
    report_path = tmp_path / "gate.json"
    check_measurement_gate.main(["--checkpoint", str(out), "--shifts", "3", "--out", str(report_path)])
    report = json.loads(report_path.read_text())
    assert [(r["shift"], r["recipe"]) for r in report["rows"]] == [(3.0, "shipped"), (3.0, "paper")]
    shipped, paper = report["rows"]
    assert shipped["finetune"]["alpha"] == 0.9
    assert paper["finetune"]["alpha"] == 0.5
    for row in report["rows"]:
        assert 0.0 <= row["canary_after"] <= 1.0
        assert row["accepted"] == (not row["reasons"])
    csv, schema, _ = table
    plain = tmp_path / "plain.pt"
    args = ["--csv", str(csv), "--schema", str(schema), "--tiny", "--dry-run", "--out", str(plain)]
    assert train_measurement.main(args) == 0
    assert load_checkpoint(plain)[1].provenance["adapt_recipe"]["epochs"] == 20  # every model ships one
    with pytest.raises(SystemExit, match="synthetic"):  # a table-trained model has no generator to shift
        check_measurement_gate.main(["--checkpoint", str(plain), "--out", str(tmp_path / "x.json")])


def test_the_oracles_feature_set_spans_f_and_the_report_is_written(tmp_path: Path) -> None:
    ds = make_dataset(2)
    eq = ds.equations
    c = ds.train.c.astype(np.float64)
    phi = measurement_oracles.quadratic_features(ds.train.y, c, 5)
    assert phi.shape == (450, 5 + 5 + 25 + 15)
    exact = eq.f(ds.train.y, c)  # noise-free children: least squares must recover f to rounding
    coef, *_ = np.linalg.lstsq(phi, exact, rcond=None)
    far = c + 3.0  # and extrapolate it exactly, 3 SD out
    predicted = measurement_oracles.quadratic_features(ds.train.y, far, 5) @ coef
    np.testing.assert_allclose(predicted, eq.f(ds.train.y, far), atol=1e-8)
    out = tmp_path / "oracles.json"
    measurement_oracles.main(["--seeds", "0", "--shifts", "0", "3", "--draws", "200", "--out", str(out)])
    report = json.loads(out.read_text())
    row = report["per_seed"][0]
    assert set(row) == {
        "clean.true_f",
        "clean.least_squares",
        "coparent_shift.3.true_f",
        "coparent_shift.3.least_squares",
    }
    assert row["clean.true_f"] > 0.9  # knowing f, the children pin the label down
    assert row["coparent_shift.3.true_f"] >= row["coparent_shift.3.least_squares"]


def test_evaluation_dry_run_writes_tables_plots_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    metrics = REPO / "docs" / "results" / "metrics.json"
    before = metrics.read_text() if metrics.exists() else None
    evaluate_measurement.main(["--dry-run", "--out-dir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "Fig. 14" in printed
    assert "Fig. 15" in printed
    report = json.loads((tmp_path / "measurement_robustness.json").read_text())
    assert "child_shift.1.cama_ft" in report["summary"]
    assert "measurement.child_shift.1.cama_ft" in report["metrics"]
    assert "measurement.clean_after_ft.cama" in report["metrics"]
    assert (tmp_path / "measurement_fig14.png").exists()
    assert (tmp_path / "measurement_fig15.png").exists()
    assert (metrics.read_text() if metrics.exists() else None) == before  # a dry run leaves metrics alone
    (tmp_path / "measurement_fig14.png").unlink()
    evaluate_measurement.main(["--replot", "--out-dir", str(tmp_path)])
    assert "Fig. 14" in capsys.readouterr().out
    assert (tmp_path / "measurement_fig14.png").exists()
    assert (
        json.loads((tmp_path / "measurement_robustness.json").read_text())["per_seed"] == report["per_seed"]
    )


def test_every_entry_point_is_smoke_tested() -> None:
    tested = {
        "training.train_measurement",
        "experiments.evaluate_measurement",
        "experiments.check_measurement_gate",
        "experiments.measurement_oracles",
    }
    found = {
        f"{package}.{p.stem}"
        for package in ("training", "experiments")
        for p in (REPO / package).glob("*measurement*.py")
        if "__main__" in p.read_text()
    }
    assert found == set(ENTRY_POINTS) == tested

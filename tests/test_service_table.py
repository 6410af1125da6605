"""A model trained from a user's CSV, served: rows keyed by column names in the table's own units,
answers with class names, the schema in ``GET /models/{name}`` (real CLI, real HTTP)."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from cama.checkpoint import load_checkpoint
from harness.processes import ROOT, ServiceProcess, service_env
from training.measurement_data import make_dataset, schema_dict, to_frame

TOKEN = "table-Vq3xL9-wPz2mK7rT_hY4"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CLASSES = [f"class_{i}" for i in range(5)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("table")
    ds = make_dataset(0, n_train=80, n_val=0, n_test=20)
    train = to_frame(ds.train).rename(columns={"y": "label"})
    train["label"] = train["label"].map(lambda v: f"class_{v}")
    (root / "train.csv").write_text(train.to_csv(index=False))
    (root / "schema.json").write_text(json.dumps({**schema_dict(), "target": "label"}))
    seed_dir = root / "seed"
    seed_dir.mkdir()
    subprocess.run(  # as a user trains it
        [sys.executable, "-m", "training.train_measurement", "--csv", str(root / "train.csv"), "--schema",
         str(root / "schema.json"), "--out", str(seed_dir / "table_cama.pt"), "--tiny", "--epochs", "1",
         "--threads", "1"],
        cwd=ROOT, env=service_env(), check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    _, meta = load_checkpoint(seed_dir / "table_cama.pt")
    test = to_frame(ds.test).drop(columns=["y"])
    svc = ServiceProcess(
        root / "api.log",
        model_store=str(root / "store"),
        seed_dir=str(seed_dir),
        models=["table"],
        token=TOKEN,
        finetune={"epochs": 1},
    )
    try:
        svc.wait_ready()
        yield svc, test, meta.provenance["encoding"]
    finally:
        svc.stop()


def test_named_rows_in_table_units_are_classified_with_class_names(served):
    svc, test, encoding = served
    rows = test.to_dict(orient="records")
    r = httpx.post(f"{svc.url}/predict", json={"model": "table", "rows": rows, "seed": 3}, timeout=60)
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    assert len(predictions) == len(rows)
    for p in predictions:
        assert p["class_name"] == CLASSES[p["label"]]
    # the same rows in model space, standardised by hand with the stored statistics: the same answer
    stats, schema = encoding["standardization"], encoding["schema"]

    def space(row, cols):
        return [(row[c] - stats["mean"][c]) / stats["std"][c] for c in cols]

    records = [
        {
            "a": space(r_, schema["parents"]),
            "c": space(r_, schema["coparents"]),
            "x": space(r_, schema["children"]),
        }
        for r_ in rows
    ]
    same = httpx.post(
        f"{svc.url}/predict", json={"model": "table", "records": records, "seed": 3}, timeout=60
    )
    assert same.status_code == 200
    for a, b in zip(predictions, same.json()["predictions"], strict=True):
        assert a["label"] == b["label"]
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-4)


def test_the_model_shows_its_schema(served):
    svc, _, encoding = served
    body = httpx.get(f"{svc.url}/models/table", timeout=30).json()
    schema = body["schema"]
    assert schema["classes"] == CLASSES
    assert schema["children"] == encoding["schema"]["children"]
    assert schema["parents"] == encoding["schema"]["parents"]
    assert schema["mean"]["x1"] == pytest.approx(encoding["standardization"]["mean"]["x1"])


@pytest.mark.parametrize(
    ("change", "why", "column"),
    [
        (lambda row: {**row, "bogus": 1.0}, "unknown_column", "bogus"),
        (lambda row: {k: v for k, v in row.items() if k != "x3"}, "missing_column", "x3"),
        (lambda row: {**row, "a2": "12.5"}, "non_numeric_column", "a2"),
        (lambda row: {**row, "c1": True}, "non_numeric_column", "c1"),
    ],
)
def test_bad_rows_name_the_column(served, change, why, column):
    svc, test, _ = served
    row = change(test.to_dict(orient="records")[0])
    r = httpx.post(f"{svc.url}/predict", json={"model": "table", "rows": [row]}, timeout=30)
    assert (r.status_code, r.json()["detail"]["reason"]) == (422, why)
    assert repr(column) in r.json()["detail"]["message"]


def test_adaptation_takes_named_rows_and_keeps_the_schema(served):
    svc, test, _ = served
    rows = test.to_dict(orient="records")
    with httpx.Client(base_url=svc.url, headers=AUTH, timeout=60) as client:
        r = client.post("/adapt", json={"model": "table", "rows": rows})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        from harness.processes import wait_job, wait_served

        job = wait_job(client, job_id, timeout=240)
        assert job["state"] in ("succeeded", "rejected"), job
        if job["state"] == "succeeded":  # an adapted version keeps answering rows with class names
            answer = wait_served(client, {"model": "table", "rows": rows[:2]}, job["version"])
            assert answer["version"] == job["version"]
            assert answer["predictions"][0]["class_name"] in CLASSES

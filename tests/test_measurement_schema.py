"""Users' tables: schema validation errors (with their reason codes) and the stored standardisation."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.measurement_schema import (
    SCHEMA_REASONS,
    Encoding,
    SchemaError,
    TableSchema,
    check_table,
    read_table,
)

SCHEMA = TableSchema(target="label", parents=("p1",), coparents=("q1", "q2"), children=("k1", "k2"))


def frame(n: int = 30, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    data = {name: rng.normal(3.0, 2.0, n) for name in SCHEMA.features}
    data["label"] = rng.choice(["low", "mid", "high"], size=n)
    return pd.DataFrame(data)


def reason_of(fn: Callable[[], object]) -> str:
    with pytest.raises(SchemaError) as info:
        fn()
    assert info.value.reason in SCHEMA_REASONS
    return info.value.reason


def test_valid_table_encodes_with_training_statistics() -> None:
    df = frame()
    enc = Encoding.fit(df, SCHEMA)
    assert enc.classes == ("high", "low", "mid")
    data = enc.encode(df)
    assert data.a.shape == (30, 1)
    assert data.c.shape == (30, 2)
    assert data.x.shape == (30, 2)
    assert np.allclose(data.x.mean(0), 0.0, atol=1e-5)
    assert np.allclose(data.x.std(0), 1.0, atol=1e-5)
    assert data.y is not None
    assert set(data.y) <= {0, 1, 2}
    # the statistics travel with the checkpoint: a round trip applies the same transform
    again = Encoding.from_dict(json.loads(json.dumps(enc.to_dict())))
    other = frame(10, seed=1)
    assert np.array_equal(again.encode(other).x, enc.encode(other).x)
    assert np.allclose(enc.encode(other).x[:, 0], (other["k1"] - df["k1"].mean()) / df["k1"].std(ddof=0))


def test_integer_labels_are_class_names_in_numeric_order() -> None:
    df = frame()
    df["label"] = np.random.default_rng(0).integers(0, 11, len(df))
    enc = Encoding.fit(df, SCHEMA)
    assert list(enc.classes) == [str(v) for v in sorted(set(df["label"]))]


@pytest.mark.parametrize(
    ("mutate", "reason", "column"),
    [
        (lambda df: df.drop(columns=["q2"]), "missing_column", "q2"),
        (lambda df: df.drop(columns=["label"]), "missing_column", "label"),
        (lambda df: df.assign(k1=df["k1"].where(df.index != 4)), "nan_value", "k1"),
        (lambda df: df.assign(label=df["label"].where(df.index != 2)), "nan_value", "label"),
        (lambda df: df.assign(p1=np.where(df.index == 3, np.inf, df["p1"])), "non_finite", "p1"),
        (lambda df: df.assign(q1=["a"] * len(df)), "wrong_type", "q1"),
        (lambda df: df.assign(q1=[True] * len(df)), "wrong_type", "q1"),
        (lambda df: df.assign(label=np.linspace(0, 1, len(df))), "wrong_type", "label"),
        (lambda df: df.iloc[0:0], "empty_table", None),
        (lambda df: df.assign(label="only"), "too_few_classes", None),
    ],
)
def test_training_table_errors_have_reason_codes(
    mutate: Callable[[pd.DataFrame], pd.DataFrame], reason: str, column: str | None
) -> None:
    bad = mutate(frame())
    with pytest.raises(SchemaError) as info:
        Encoding.fit(bad, SCHEMA)
    assert info.value.reason == reason
    assert info.value.column == column
    assert info.value.as_dict()["reason"] == reason


def test_prediction_table_errors() -> None:
    enc = Encoding.fit(frame(), SCHEMA)
    unseen = frame(5, seed=3).assign(label=["low", "low", "huge", "mid", "low"])
    assert reason_of(lambda: enc.encode(unseen)) == "unknown_label"
    # the target is optional at prediction, the features are not
    assert enc.encode(frame(5).drop(columns=["label"]), require_target=False).y is None
    assert (
        reason_of(lambda: enc.encode(frame(5).drop(columns=["k2"]), require_target=False)) == "missing_column"
    )
    assert reason_of(lambda: check_table(frame(5).drop(columns=["label"]), SCHEMA)) == "missing_column"


def test_declared_classes_fix_the_label_set() -> None:
    schema = TableSchema.from_dict({**SCHEMA.to_dict(), "classes": ["low", "mid", "high", "absent"]})
    enc = Encoding.fit(frame(), schema)
    assert enc.classes == ("low", "mid", "high", "absent")
    assert reason_of(lambda: Encoding.fit(frame().assign(label="other"), schema)) == "unknown_label"
    bad = frame()
    bad.loc[0, "label"] = "other"
    assert reason_of(lambda: enc.encode(bad)) == "unknown_label"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"target": "y", "parents": ["a"], "coparents": [], "children": []}, "bad_schema"),
        ({"parents": ["a"], "children": ["x"]}, "bad_schema"),
        ({"target": "y", "children": ["x"], "extra": 1}, "bad_schema"),
        ({"target": "y", "children": "x1,x2", "parents": [1, 2]}, "bad_schema"),
        ({"target": "y", "children": ["x", "a"], "parents": ["a"]}, "duplicate_column"),
        ({"target": "y", "children": ["y"]}, "duplicate_column"),
        ({"target": "y", "children": ["x"], "classes": ["a"]}, "too_few_classes"),
        ("not an object", "bad_schema"),
    ],
)
def test_schema_errors(data: object, reason: str) -> None:
    assert reason_of(lambda: TableSchema.from_dict(data)) == reason


def test_schema_from_json_and_comma_lists(tmp_path: Path) -> None:
    path = tmp_path / "schema.json"
    path.write_text(json.dumps({"target": "y", "parents": "a1, a2", "children": ["x1"]}))
    schema = TableSchema.from_json(path)
    assert schema.parents == ("a1", "a2")
    assert schema.coparents == ()
    assert schema.children == ("x1",)
    assert TableSchema.from_dict(schema.to_dict()) == schema
    (tmp_path / "broken.json").write_text("{not json")
    assert reason_of(lambda: TableSchema.from_json(tmp_path / "broken.json")) == "bad_schema"


def test_read_table_formats(tmp_path: Path) -> None:
    df = frame()
    df.to_csv(tmp_path / "t.csv", index=False)
    df.to_parquet(tmp_path / "t.parquet")
    assert read_table(tmp_path / "t.csv").shape == df.shape
    pd.testing.assert_frame_equal(read_table(tmp_path / "t.parquet"), df)
    assert reason_of(lambda: read_table(tmp_path / "t.txt")) == "unsupported_format"
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    assert reason_of(lambda: read_table(tmp_path / "bad.parquet")) == "unreadable"
    assert reason_of(lambda: read_table(tmp_path / "absent.csv")) == "unreadable"

"""Users' own tables (CSV or Parquet) for the measurement CAMA: a declared schema, validation, encoding.

A schema names the categorical target and which continuous columns are the target's parents
(``a``), co-parents (``c``) and children (``x``); it comes from a JSON file or from flags::

    {"target": "diagnosis", "parents": ["age"], "coparents": ["site_bias"],
     "children": ["m1", "m2", "m3"], "classes": ["healthy", "sick"]}

``classes`` is optional (default: the sorted labels of the training table). Every problem is a
:class:`SchemaError` with a machine-readable ``reason``:

=====================  ==========================================================================
``bad_schema``         the schema itself is malformed (missing target, no children, not a list)
``duplicate_column``   a column is named twice (in one role or in two)
``unsupported_format`` a table that is neither ``.csv`` nor ``.parquet``
``unreadable``         the file cannot be read or parsed
``empty_table``        no rows
``missing_column``     a column the schema names is absent from the table
``wrong_type``         a feature column that is not numeric, or a continuous-valued target
``nan_value``          a missing value (NaN / empty cell) in a feature or the target
``non_finite``         an infinite value in a feature
``unknown_label``      a target value outside the declared (or trained) classes
``too_few_classes``    fewer than two classes to train on
=====================  ==========================================================================

Features are standardised with the training table's mean and standard deviation; the
:class:`Standardizer` is stored in the checkpoint's provenance so that prediction applies the same
transform.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

SCHEMA_REASONS = (
    "bad_schema",
    "duplicate_column",
    "unsupported_format",
    "unreadable",
    "empty_table",
    "missing_column",
    "wrong_type",
    "nan_value",
    "non_finite",
    "unknown_label",
    "too_few_classes",
)


class SchemaError(ValueError):
    """A table or schema problem, with a machine-readable ``reason`` and the ``column`` if any."""

    def __init__(self, reason: str, message: str, *, column: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.column = column

    def as_dict(self) -> dict[str, Any]:
        """``{"reason", "message", "column"}`` for an API response."""
        return {"reason": self.reason, "message": str(self), "column": self.column}


def _names(value: Any, role: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise SchemaError("bad_schema", f"schema field {role!r} must be a list of column names")
    return tuple(value)


@dataclass(frozen=True)
class TableSchema:
    """Which column plays which role in the Markov blanket of the target (fig. 5)."""

    target: str
    parents: tuple[str, ...]
    coparents: tuple[str, ...]
    children: tuple[str, ...]
    classes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.target, str) or not self.target:
            raise SchemaError("bad_schema", "the schema must name a target column")
        if not self.children:
            raise SchemaError("bad_schema", "the schema must name at least one child column")
        seen: set[str] = set()
        for name in (self.target, *self.features):
            if name in seen:
                raise SchemaError("duplicate_column", f"column {name!r} is named twice", column=name)
            seen.add(name)
        if self.classes is not None:
            if len(set(self.classes)) != len(self.classes):
                raise SchemaError("bad_schema", "declared classes must be distinct")
            if len(self.classes) < 2:
                raise SchemaError("too_few_classes", "declare at least two classes")

    @property
    def features(self) -> tuple[str, ...]:
        """Every feature column, parents then co-parents then children."""
        return (*self.parents, *self.coparents, *self.children)

    @classmethod
    def from_dict(cls, data: Any) -> TableSchema:
        """Build from ``{"target", "parents", "coparents", "children"[, "classes"]}``."""
        if not isinstance(data, dict):
            raise SchemaError("bad_schema", "a schema is a JSON object")
        unknown = set(data) - {"target", "parents", "coparents", "children", "classes"}
        if unknown:
            raise SchemaError("bad_schema", f"unknown schema fields {sorted(unknown)}")
        classes = data.get("classes")
        return cls(
            target=data.get("target", ""),
            parents=_names(data.get("parents"), "parents"),
            coparents=_names(data.get("coparents"), "coparents"),
            children=_names(data.get("children"), "children"),
            classes=None if classes is None else tuple(str(v) for v in classes),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> TableSchema:
        """Read a schema file."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SchemaError("bad_schema", f"cannot read schema {path}: {exc}") from exc
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``from_dict`` inverts it)."""
        out: dict[str, Any] = {
            "target": self.target,
            "parents": list(self.parents),
            "coparents": list(self.coparents),
            "children": list(self.children),
        }
        if self.classes is not None:
            out["classes"] = list(self.classes)
        return out


def read_table(path: str | Path) -> pd.DataFrame:
    """A CSV or Parquet file as a data frame (by suffix)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise SchemaError("unsupported_format", f"{path}: expected a .csv or .parquet file")
    try:
        if suffix == ".csv":
            return pd.read_csv(path)
        return pd.read_parquet(path)
    except (OSError, ValueError, ImportError) as exc:
        raise SchemaError("unreadable", f"cannot read {path}: {exc}") from exc


def label_strings(values: pd.Series) -> list[str]:
    """Target values as class names: integers and integral floats as ``"3"``, others as ``str``."""
    return [str(int(v)) if isinstance(v, float) and v.is_integer() else str(v) for v in values.tolist()]


def check_table(frame: pd.DataFrame, schema: TableSchema, *, require_target: bool = True) -> None:
    """Raise :class:`SchemaError` unless ``frame`` has every column, numeric and complete."""
    if len(frame) == 0:
        raise SchemaError("empty_table", "the table has no rows")
    needed = (schema.target, *schema.features) if require_target else schema.features
    for name in needed:
        if name not in frame.columns:
            raise SchemaError("missing_column", f"column {name!r} is not in the table", column=name)
    for name in schema.features:
        col = frame[name]
        if pd.api.types.is_bool_dtype(col) or not pd.api.types.is_numeric_dtype(col):
            raise SchemaError(
                "wrong_type", f"column {name!r} must be numeric (found {col.dtype})", column=name
            )
        if col.isna().any():
            row = int(np.flatnonzero(col.isna().to_numpy())[0])
            raise SchemaError("nan_value", f"column {name!r} has a missing value (row {row})", column=name)
        if not np.isfinite(col.to_numpy(dtype=np.float64)).all():
            raise SchemaError("non_finite", f"column {name!r} has an infinite value", column=name)
    if schema.target in frame.columns:
        target = frame[schema.target]
        if target.isna().any():
            row = int(np.flatnonzero(target.isna().to_numpy())[0])
            raise SchemaError(
                "nan_value", f"target {schema.target!r} has a missing label (row {row})", column=schema.target
            )
        if pd.api.types.is_float_dtype(target) and not all(
            math.isfinite(v) and float(v).is_integer() for v in target
        ):
            raise SchemaError(
                "wrong_type",
                f"target {schema.target!r} must be categorical, found continuous values",
                column=schema.target,
            )


@dataclass(frozen=True)
class Standardizer:
    """Per-column ``(v - mean) / std`` with the training table's statistics."""

    mean: dict[str, float]
    std: dict[str, float]

    @classmethod
    def fit(cls, frame: pd.DataFrame, columns: tuple[str, ...]) -> Standardizer:
        """Statistics of ``columns``; a constant column gets std 1."""
        mean, std = {}, {}
        for name in columns:
            values = frame[name].to_numpy(dtype=np.float64)
            mean[name] = float(values.mean())
            s = float(values.std())
            std[name] = s if s > 1e-12 else 1.0
        return cls(mean, std)

    def apply(self, frame: pd.DataFrame, columns: tuple[str, ...]) -> np.ndarray:
        """Standardised ``columns`` as float32, ``(N, len(columns))``."""
        out = np.empty((len(frame), len(columns)), dtype=np.float32)
        for j, name in enumerate(columns):
            out[:, j] = (frame[name].to_numpy(dtype=np.float64) - self.mean[name]) / self.std[name]
        return out

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {"mean": dict(self.mean), "std": dict(self.std)}

    @classmethod
    def from_dict(cls, data: dict[str, dict[str, float]]) -> Standardizer:
        return cls(dict(data["mean"]), dict(data["std"]))


@dataclass(frozen=True)
class Encoded:
    """Model-space arrays: ``a``, ``c``, ``x`` standardised float32, ``y`` class indices or None."""

    a: np.ndarray
    c: np.ndarray
    x: np.ndarray
    y: np.ndarray | None

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True)
class Encoding:
    """Everything prediction needs to turn a table into model inputs, stored in provenance."""

    schema: TableSchema
    classes: tuple[str, ...]
    standardizer: Standardizer

    @classmethod
    def fit(cls, frame: pd.DataFrame, schema: TableSchema) -> Encoding:
        """Check a training table and fit the classes and standardisation to it."""
        check_table(frame, schema, require_target=True)
        seen = sorted(set(label_strings(frame[schema.target])), key=_natural_key)
        classes = schema.classes if schema.classes is not None else tuple(seen)
        if len(classes) < 2:
            raise SchemaError("too_few_classes", f"the target has {len(classes)} class(es); need two")
        unknown = [v for v in seen if v not in classes]
        if unknown:
            raise SchemaError(
                "unknown_label",
                f"target {schema.target!r} has labels {unknown[:5]} outside the declared classes "
                f"{list(classes)}",
                column=schema.target,
            )
        return cls(schema, classes, Standardizer.fit(frame, schema.features))

    def encode(self, frame: pd.DataFrame, *, require_target: bool = True) -> Encoded:
        """Validate ``frame`` and map it to model space; the target is optional at prediction."""
        check_table(frame, self.schema, require_target=require_target)
        s = self.schema
        y = None
        if s.target in frame.columns:
            index = {name: i for i, name in enumerate(self.classes)}
            labels = label_strings(frame[s.target])
            unknown = sorted({v for v in labels if v not in index})
            if unknown:
                raise SchemaError(
                    "unknown_label",
                    f"target {s.target!r} has labels {unknown[:5]} outside the classes {list(self.classes)}",
                    column=s.target,
                )
            y = np.array([index[v] for v in labels], dtype=np.int64)
        std = self.standardizer
        return Encoded(
            std.apply(frame, s.parents), std.apply(frame, s.coparents), std.apply(frame, s.children), y
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema.to_dict(),
            "classes": list(self.classes),
            "standardization": self.standardizer.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Encoding:
        return cls(
            TableSchema.from_dict(data["schema"]),
            tuple(data["classes"]),
            Standardizer.from_dict(data["standardization"]),
        )


def _natural_key(label: str) -> tuple[int, float | str]:
    """Numeric labels in numeric order, before other labels in string order."""
    try:
        return (0, float(label))
    except ValueError:
        return (1, label)

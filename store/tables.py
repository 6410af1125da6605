"""Rows of a user's table, as the user holds them, turned into a measurement model's inputs.

A model trained from a table (``python -m training.train_measurement --csv ... --schema ...``)
carries its encoding in its checkpoint provenance (``encoding``: the schema, the class names and
the training table's per-column mean and standard deviation). The service reads that record,
with no training code, and maps a row keyed by column names in the table's own units to model
space: ``a`` (parents), ``c`` (co-parents), ``x`` (children), each column ``(v - mean) / std``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from store.data import Inputs
from store.errors import InvalidInputError


@dataclass(frozen=True)
class RowEncoding:
    """A table schema with its class names and standardisation."""

    target: str
    parents: tuple[str, ...]
    coparents: tuple[str, ...]
    children: tuple[str, ...]
    classes: tuple[str, ...]
    mean: dict[str, float]
    std: dict[str, float]

    @property
    def features(self) -> tuple[str, ...]:
        return (*self.parents, *self.coparents, *self.children)

    @classmethod
    def from_provenance(cls, provenance: Mapping[str, Any]) -> RowEncoding | None:
        """The encoding a checkpoint's (or manifest's) provenance carries, or None."""
        data = provenance.get("encoding")
        if not isinstance(data, Mapping):
            return None
        schema, stats = data["schema"], data["standardization"]
        return cls(
            target=str(schema["target"]),
            parents=tuple(schema.get("parents", ())),
            coparents=tuple(schema.get("coparents", ())),
            children=tuple(schema["children"]),
            classes=tuple(str(c) for c in data["classes"]),
            mean={k: float(v) for k, v in stats["mean"].items()},
            std={k: float(v) for k, v in stats["std"].items()},
        )

    def public(self) -> dict[str, Any]:
        """The schema as ``GET /models/{name}`` shows it."""
        return {
            "target": self.target,
            "parents": list(self.parents),
            "coparents": list(self.coparents),
            "children": list(self.children),
            "classes": list(self.classes),
            "mean": {k: self.mean[k] for k in self.features},
            "std": {k: self.std[k] for k in self.features},
        }

    def _value(self, row: Mapping[str, object], column: str, index: int) -> float:
        if column not in row:
            raise InvalidInputError(f"row {index}: column {column!r} is missing", reason="missing_column")
        value = row[column]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidInputError(
                f"row {index}: column {column!r} must be a number, got {type(value).__name__}",
                reason="non_numeric_column",
            )
        if not math.isfinite(value):
            raise InvalidInputError(f"row {index}: column {column!r} is not finite", reason="non_finite")
        return (float(value) - self.mean[column]) / self.std[column]

    def encode(self, rows: Sequence[Mapping[str, object]]) -> Inputs:
        """Rows in the table's units -> standardised ``Inputs(x, (a, c))``; the target may be present
        (it is ignored); an unknown, missing or non-numeric column is refused by name."""
        if not rows:
            raise InvalidInputError("no rows given", reason="no_inputs")
        known = {*self.features, self.target}
        parts = {
            role: np.empty((len(rows), len(cols)), np.float32)
            for role, cols in (("a", self.parents), ("c", self.coparents), ("x", self.children))
        }
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise InvalidInputError(f"row {i}: expected an object of columns", reason="bad_shape")
            unknown = sorted(str(k) for k in row if k not in known)
            if unknown:
                raise InvalidInputError(
                    f"row {i}: unknown column {unknown[0]!r} (the schema has {list(self.features)})",
                    reason="unknown_column",
                )
            for role, cols in (("a", self.parents), ("c", self.coparents), ("x", self.children)):
                for j, column in enumerate(cols):
                    parts[role][i, j] = self._value(row, column, i)
        return Inputs(parts["x"], (parts["a"], parts["c"]))


def class_names(provenance: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The class names, in label order, a checkpoint's (or manifest's) provenance carries: a table
    model's encoding's, or ``class_names`` of a model trained on a user's own images; else None."""
    encoding = RowEncoding.from_provenance(provenance)
    if encoding is not None:
        return encoding.classes
    names = provenance.get("class_names")
    return tuple(str(name) for name in names) if isinstance(names, list | tuple) and names else None

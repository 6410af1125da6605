"""The flat metrics file ``docs/results/metrics.json`` (DVC-style: key -> number).

Several commands write into the one file; each rewrites only the keys it measured and keeps the
rest, so the file always holds the latest measurement of every figure.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from cama.runtime import atomic_write

METRICS_PATH = Path("docs/results/metrics.json")


def update_metrics(
    values: dict[str, float], path: Path = METRICS_PATH, *, drop: tuple[str, ...] = ()
) -> dict[str, float]:
    """Merge ``values`` into the metrics file atomically (removing the keys ``drop``, figures the
    command no longer measures here) and return the whole file's content."""
    for key, value in values.items():
        if not isinstance(value, int | float) or not math.isfinite(float(value)):
            raise ValueError(f"metric {key} must be a finite number, got {value!r}")
    current: dict[str, float] = {}
    if path.exists():
        current = json.loads(path.read_text())
    for key in drop:
        current.pop(key, None)
    current.update({k: float(v) for k, v in values.items()})
    atomic_write(path, json.dumps(dict(sorted(current.items())), indent=2) + "\n")
    return current

"""Model inputs as arrays, and the labelled serving data stored with each version.

Two kinds of model share one code path: images (``x (B, 1, 28, 28)``, no cond) and measurement
data (children ``x (B, dX)`` with ``cond = (a, c)``, parents and co-parents).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cama.runtime import atomic_write
from store.errors import InvalidInputError

INPUT_NAMES: dict[str, tuple[str, ...]] = {"image": ("x",), "measurement": ("x", "a", "c")}


@dataclass(frozen=True)
class Inputs:
    """float32 arrays with the batch first: ``x`` and the cond tensors (``()`` or ``(a, c)``)."""

    x: np.ndarray
    cond: tuple[np.ndarray, ...] = ()

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def kind(self) -> str:
        return "measurement" if self.cond else "image"

    def named(self) -> dict[str, np.ndarray]:
        """The arrays keyed by their ONNX input names."""
        return dict(zip(INPUT_NAMES[self.kind], (self.x, *self.cond), strict=True))

    def take(self, idx: np.ndarray | slice) -> Inputs:
        return Inputs(self.x[idx], tuple(c[idx] for c in self.cond))

    @staticmethod
    def concat(parts: list[Inputs]) -> Inputs:
        if len(parts) == 1:
            return parts[0]
        n_cond = len(parts[0].cond)
        return Inputs(
            np.concatenate([p.x for p in parts]),
            tuple(np.concatenate([p.cond[i] for p in parts]) for i in range(n_cond)),
        )

    def digest(self) -> str:
        """SHA-256 of the arrays' bytes: the data hash recorded in a version's lineage."""
        h = hashlib.sha256()
        for arr in (self.x, *self.cond):
            h.update(np.ascontiguousarray(arr, dtype=np.float32).tobytes())
        return h.hexdigest()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write as ``.npz`` (x, and a, c when present), atomically."""
        named = self.named()
        atomic_write(path, lambda fh: np.savez(fh, **named))  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Inputs:
        with np.load(Path(path)) as d:
            x = d["x"].astype(np.float32)
            cond = (d["a"].astype(np.float32), d["c"].astype(np.float32)) if "a" in d else ()
        return cls(x, cond)


def _as_float(x: np.ndarray, kind: str) -> np.ndarray:
    """uint8 images -> float32 in [0, 1], shaped ``(N, 1, 28, 28)``; others -> float32."""
    out = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    if kind == "image" and out.ndim == 3:
        out = out[:, None]
    return out


@dataclass(frozen=True)
class ServingData:
    """Labelled clean data stored with a model: replay (eq. 8's clean term) and canary (the gate)."""

    replay: Inputs
    replay_y: np.ndarray
    canary: Inputs
    canary_y: np.ndarray

    @property
    def kind(self) -> str:
        return self.replay.kind

    def input_shapes(self) -> dict[str, list[int]]:
        """Per-input shapes without the batch dimension, as the manifest records them."""
        return {name: list(arr.shape[1:]) for name, arr in self.replay.named().items()}

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ServingData:
        """Read ``replay_{x,y[,a,c]}`` and ``canary_{x,y[,a,c]}`` (uint8 images are scaled to [0, 1])."""
        with np.load(Path(path)) as d:
            kind = "measurement" if "replay_a" in d else "image"

            def part(prefix: str) -> tuple[Inputs, np.ndarray]:
                x = _as_float(d[f"{prefix}_x"], kind)
                cond = (
                    (d[f"{prefix}_a"].astype(np.float32), d[f"{prefix}_c"].astype(np.float32))
                    if kind == "measurement"
                    else ()
                )
                return Inputs(x, cond), d[f"{prefix}_y"].astype(np.int64)

            replay, replay_y = part("replay")
            canary, canary_y = part("canary")
        return cls(replay, replay_y, canary, canary_y)


def save_serving_data(
    path: str | os.PathLike[str],
    replay: tuple[np.ndarray, np.ndarray],
    canary: tuple[np.ndarray, np.ndarray],
    replay_cond: tuple[np.ndarray, np.ndarray] | None = None,
    canary_cond: tuple[np.ndarray, np.ndarray] | None = None,
) -> Path:
    """Write a serving-data file; images are best stored as uint8 ``(N, 28, 28)`` (compressed)."""
    arrays: dict[str, np.ndarray] = {
        "replay_x": replay[0],
        "replay_y": replay[1].astype(np.int64),
        "canary_x": canary[0],
        "canary_y": canary[1].astype(np.int64),
    }
    if replay_cond is not None and canary_cond is not None:
        arrays.update(
            replay_a=replay_cond[0], replay_c=replay_cond[1], canary_a=canary_cond[0], canary_c=canary_cond[1]
        )
    return atomic_write(path, lambda fh: np.savez_compressed(fh, **arrays))  # type: ignore[arg-type]


def check_shapes(inputs: Inputs, kind: str, shapes: dict[str, list[int]]) -> None:
    """Refuse inputs of the wrong kind or per-input shape for a model."""
    if inputs.kind != kind:
        wanted = "images" if kind == "image" else "records"
        raise InvalidInputError(f"this model takes {wanted}", reason="wrong_input_kind")
    for name, arr in inputs.named().items():
        expected = shapes.get(name)
        if expected is not None and list(arr.shape[1:]) != list(expected):
            raise InvalidInputError(
                f"input {name!r} has shape {list(arr.shape[1:])}, the model expects {expected}",
                reason="bad_shape",
            )

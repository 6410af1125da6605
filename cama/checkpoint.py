"""Self-describing checkpoints: config + weights + schema version + provenance + metrics.

A checkpoint rebuilds its model with the core alone (no training code). Files are written
atomically (temporary file, fsync, rename) so that a reader never sees a partial checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
import pickle
import subprocess
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cama.runtime import atomic_write

SCHEMA_VERSION = 1

# config "kind" -> ("module:ConfigClass", "module:ModelClass"), imported lazily.
MODEL_KINDS: dict[str, tuple[str, str]] = {
    "image": ("cama.config:ImageCamaConfig", "cama.image_model:ImageCama"),
    "measurement": (
        "cama.measurement_model:MeasurementCamaConfig",
        "cama.measurement_model:MeasurementCama",
    ),
}


# kinds registered by the packages that define them (e.g. the discriminative baselines of
# ``training.baselines``): config kind -> (config class, model class)
REGISTERED_KINDS: dict[str, tuple[type[Any], type[nn.Module]]] = {}


def register_model_kind(kind: str, config_type: type[Any], model_type: type[nn.Module]) -> None:
    """Let checkpoints of ``kind`` (the ``kind`` field of their config) rebuild ``model_type``."""
    if kind in MODEL_KINDS:
        raise ValueError(f"model kind {kind!r} is the core's own")
    REGISTERED_KINDS[kind] = (config_type, model_type)


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable, of an unknown schema or kind, or does not match its config."""


@dataclass
class Checkpoint:
    """What a checkpoint holds besides the weights."""

    config: dict[str, Any]
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def kind(self) -> str:
        """The model kind its config names."""
        return str(self.config.get("kind"))


def git_commit() -> str:
    """The current git commit of the working tree, or ``"unknown"``."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],  # noqa: S607 - git from PATH
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip()


def _config_to_dict(config: Any) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


def build_model(config: dict[str, Any]) -> nn.Module:
    """Instantiate the model a config dict describes (tuples restored from lists)."""
    kind = config.get("kind")
    if kind in REGISTERED_KINDS:
        cfg_type, model_type = REGISTERED_KINDS[kind]
    elif kind in MODEL_KINDS:
        cfg_type, model_type = (_import(name) for name in MODEL_KINDS[kind])
    else:
        known = sorted({*MODEL_KINDS, *REGISTERED_KINDS})
        raise CheckpointError(f"unknown model kind {kind!r}; known: {known}")
    fields = {f.name for f in dataclasses.fields(cfg_type)}
    unknown = set(config) - fields
    if unknown:
        raise CheckpointError(f"config has unknown fields {sorted(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    model: nn.Module = model_type(cfg_type(**values))
    return model


def _import(qualified: str) -> Any:
    module, _, attr = qualified.partition(":")
    return getattr(importlib.import_module(module), attr)


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    provenance: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
) -> str:
    """Write ``model`` with its config atomically; returns the file's SHA-256."""
    config = getattr(model, "config", None)
    if config is None:
        raise CheckpointError("model has no config attribute to describe it")
    payload = {
        "schema_version": SCHEMA_VERSION,
        "config": _config_to_dict(config),
        "provenance": {"git_commit": git_commit(), **(provenance or {})},
        "metrics": dict(metrics or {}),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    return save_torch_payload(payload, path)


def save_torch_payload(payload: dict[str, Any], path: str | os.PathLike[str]) -> str:
    """``torch.save`` written atomically (:func:`cama.runtime.atomic_write`), readable by everyone;
    returns the file's SHA-256."""
    target = atomic_write(path, lambda fh: torch.save(payload, fh))
    return sha256_file(target)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, Checkpoint]:
    """Rebuild the model a checkpoint describes and load its weights (strictly)."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise CheckpointError(f"{path} is not a CAMA checkpoint")
    version = payload.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CheckpointError(f"{path}: schema version {version}, expected {SCHEMA_VERSION}")
    model = build_model(payload["config"])
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the config: {exc}") from exc
    model.eval()
    meta = Checkpoint(
        config=payload["config"],
        provenance=payload.get("provenance", {}),
        metrics=payload.get("metrics", {}),
        schema_version=version,
    )
    return model, meta

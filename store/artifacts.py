"""Turning a torch model into a registry version (checkpoint + ONNX + serving data), and seeding.

Used by the offline export (``python -m training.export_model``), by the API when its store is
empty (seeded from the committed ``models/<name>_cama.pt`` and ``models/<name>_serving_data.npz``),
and by the adaptation job.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cama.checkpoint import load_checkpoint, save_checkpoint, sha256_file
from cama.export import export_onnx
from store.data import ServingData
from store.registry import ActiveChangedError, Manifest, ModelRegistry, RegistryError

log = logging.getLogger(__name__)


def seed_paths(seed_dir: Path, name: str) -> tuple[Path, Path]:
    """The committed checkpoint and serving data that seed model ``name``.

    The data is ``<name>_serving_data.npz``, or the ``<name>_cama.replay.npz`` that
    ``training.train_measurement`` writes next to its checkpoint.
    """
    data = seed_dir / f"{name}_serving_data.npz"
    fallback = seed_dir / f"{name}_cama.replay.npz"
    return seed_dir / f"{name}_cama.pt", data if data.exists() or not fallback.exists() else fallback


def build_artifacts(
    model: nn.Module,
    serving_data: Path,
    workdir: Path,
    *,
    provenance: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
) -> tuple[dict[str, Path], ServingData]:
    """Write ``checkpoint.pt``, ``model.onnx`` (eq. 6 for every class) and ``classes.onnx`` (one class
    per input: the screened prediction's second stage) for ``model`` into ``workdir``; return the
    file map."""
    data = ServingData.load(serving_data)
    model = model.to("cpu").eval()
    checkpoint = workdir / "checkpoint.pt"
    save_checkpoint(checkpoint, model, provenance=provenance, metrics=metrics)
    example = data.canary.take(slice(0, 2))
    cond = tuple(torch.from_numpy(c) for c in example.cond)
    x = torch.from_numpy(example.x)
    onnx_path = export_onnx(model, workdir / "model.onnx", x, cond)
    classes_path = export_onnx(model, workdir / "classes.onnx", x, cond, one_class=True)
    files = {
        "checkpoint.pt": checkpoint,
        "model.onnx": onnx_path,
        "classes.onnx": classes_path,
        "replay.npz": serving_data,
    }
    return files, data


def export_checkpoint(
    registry: ModelRegistry,
    name: str,
    checkpoint: Path,
    serving_data: Path,
    *,
    activate: bool = True,
    only_if_empty: bool = False,
) -> Manifest | None:
    """Publish ``checkpoint`` as a new version of ``name`` (version 1 in an empty store).

    With ``only_if_empty``, nothing happens when the model already has an active version (seeding
    by several processes at once publishes one version).
    """
    if only_if_empty and registry.active(name) is not None:
        return None
    model, meta = load_checkpoint(checkpoint)
    kind = str(meta.config.get("kind", "image"))
    registry.root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=registry.root, prefix=".export-") as tmp:
        files, data = build_artifacts(
            model, serving_data, Path(tmp), provenance=meta.provenance, metrics=meta.metrics
        )
        if data.kind != kind:
            raise RegistryError(f"{serving_data} holds {data.kind} data but {checkpoint} is a {kind} model")
        with registry.lock(name):
            if only_if_empty and registry.active(name) is not None:
                return None
            manifest = registry.publish(
                name,
                files,
                kind=kind,
                inputs=data.input_shapes(),
                num_classes=int(getattr(model, "num_classes")),  # noqa: B009
                parent=registry.active(name),
                data_hash=meta.provenance.get("data_sha256"),
                metrics={k: float(v) for k, v in meta.metrics.items()},
                provenance={
                    **meta.provenance,
                    "source_checkpoint": str(checkpoint),
                    "source_sha256": sha256_file(checkpoint),
                },
            )
            if activate:
                registry.activate(name, manifest.version)
    return manifest


def seed_store(registry: ModelRegistry, names: list[str], seed_dir: Path) -> dict[str, str]:
    """Give every model without an active version one, from the committed files; return problems."""
    problems: dict[str, str] = {}
    for name in names:
        try:
            if registry.active(name) is not None:
                continue
            if _activate_latest(registry, name):
                continue
            checkpoint, data = seed_paths(seed_dir, name)
            if not checkpoint.exists() or not data.exists():
                problems[name] = f"empty store and no seed files ({checkpoint}, {data})"
                log.error("cannot seed %s: %s", name, problems[name])
                continue
            log.info("seeding %s from %s (exporting ONNX)", name, checkpoint)
            manifest = export_checkpoint(registry, name, checkpoint, data, only_if_empty=True)
            if manifest is not None:
                log.info("seeded %s v%d", name, manifest.version)
        except Exception as exc:
            problems[name] = f"seeding failed: {exc}"
            log.exception("seeding %s failed", name)
    return problems


def _activate_latest(registry: ModelRegistry, name: str) -> bool:
    """Versions but no ACTIVE (a crash between publish and activate): activate the newest sound one."""
    with registry.lock(name):
        if registry.active(name) is not None:
            return True
        for version in reversed(registry.versions(name)):
            try:
                registry.activate(name, version, expect=None)
            except (RegistryError, ActiveChangedError) as exc:
                log.error("not activating %s v%d: %s", name, version, exc)
                continue
            return True
    return False

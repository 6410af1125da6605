"""The versioned model registry: immutable version directories and an atomically flipped ACTIVE file.

Layout::

    <store>/<model>/<version>/checkpoint.pt   core checkpoint (config + weights + provenance)
                              model.onnx      eq. 6 log-weights with explicit noise inputs
                              classes.onnx    the same for one class per input
                              replay.npz      labelled clean replay data (eq. 8) and canary set (gate)
                              manifest.json   version, parent, created, checksums, data hash, metrics, gate
    <store>/<model>/ACTIVE                    the served version number

A version is assembled in a temporary directory and renamed into place, so a reader sees all of
it or none of it; ACTIVE is replaced with a temporary file + rename. A version whose files do not
match the checksums of its manifest is refused (:class:`CorruptVersionError`), never served.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cama.checkpoint import sha256_file
from cama.runtime import atomic_write, fsync_dir
from store.errors import ConflictError, DomainError, NotFoundError, UnavailableError

log = logging.getLogger(__name__)

ARTIFACT_FILES = ("checkpoint.pt", "model.onnx", "classes.onnx", "replay.npz")
MANIFEST = "manifest.json"
ACTIVE = "ACTIVE"


class RegistryError(DomainError):
    """Base class of registry errors."""

    reason = "registry_error"


class UnknownModelError(RegistryError, NotFoundError):
    """No such model in the store."""

    reason = "unknown_model"


class UnknownVersionError(RegistryError, NotFoundError):
    """No such version of a model."""

    reason = "unknown_version"


class CorruptVersionError(RegistryError, ConflictError):
    """A version's files are missing, unreadable or do not match its manifest's checksums."""

    reason = "corrupt_version"


class CorruptActiveError(RegistryError, UnavailableError):
    """A model's ACTIVE file does not name a version (the store needs an operator)."""

    reason = "corrupt_active"


class ActiveChangedError(RegistryError, ConflictError):
    """ACTIVE no longer holds the version a compare-and-swap expected."""

    reason = "active_changed"


@dataclass(frozen=True)
class Manifest:
    """What a version is and where it came from."""

    name: str
    version: int
    kind: str  # "image" | "measurement"
    inputs: dict[str, list[int]]  # per-input shape without the batch, e.g. {"x": [1, 28, 28]}
    num_classes: int
    files: dict[str, str]  # file name -> SHA-256
    parent: int | None = None
    created: str = ""
    data_hash: str | None = None
    job_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    gate: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


class ModelRegistry:
    """The store of one deployment (a directory shared by every API and worker process)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    # --- reading ------------------------------------------------------------------------------
    def model_dir(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise UnknownModelError(f"invalid model name {name!r}")
        return self.root / name

    def models(self) -> list[str]:
        """Models with at least one version."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def versions(self, name: str) -> list[int]:
        """Complete versions of ``name``, ascending (temporary directories are ignored)."""
        directory = self.model_dir(name)
        if not directory.is_dir():
            return []
        return sorted(
            int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / MANIFEST).exists()
        )

    def version_dir(self, name: str, version: int) -> Path:
        return self.model_dir(name) / str(version)

    def manifest(self, name: str, version: int) -> Manifest:
        """The manifest of a version (not verified against the files; see :meth:`verify`)."""
        path = self.version_dir(name, version) / MANIFEST
        if not path.exists():
            if not self.model_dir(name).is_dir():
                raise UnknownModelError(f"no model {name!r} in {self.root}")
            raise UnknownVersionError(f"model {name!r} has no version {version}")
        try:
            return Manifest.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise CorruptVersionError(f"{name} v{version}: unreadable manifest: {exc}") from exc

    def active(self, name: str) -> int | None:
        """The version ACTIVE names, or None when the model has none."""
        path = self.model_dir(name) / ACTIVE
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise CorruptActiveError(f"{name}: cannot read ACTIVE: {exc}") from exc
        if not text.isascii() or not text.isdigit():
            raise CorruptActiveError(f"{name}: ACTIVE holds {text[:32]!r}, not a version number")
        return int(text)

    def verify(self, name: str, version: int) -> Manifest:
        """The manifest, after checking every file against its recorded SHA-256."""
        manifest = self.manifest(name, version)
        directory = self.version_dir(name, version)
        if manifest.version != version or manifest.name != name:
            raise CorruptVersionError(
                f"{name} v{version}: manifest describes {manifest.name} v{manifest.version}"
            )
        for file in ARTIFACT_FILES:
            expected = manifest.files.get(file)
            path = directory / file
            if expected is None:
                raise CorruptVersionError(f"{name} v{version}: manifest has no checksum for {file}")
            try:
                actual = sha256_file(path)
            except OSError as exc:
                raise CorruptVersionError(f"{name} v{version}: cannot read {file}: {exc}") from exc
            if actual != expected:
                raise CorruptVersionError(
                    f"{name} v{version}: checksum mismatch for {file} "
                    f"(manifest {expected[:12]}..., file {actual[:12]}...)"
                )
        return manifest

    def find_by_job(self, name: str, job_id: str) -> Manifest | None:
        """The version a job produced, if any (makes a redelivered job idempotent)."""
        for version in reversed(self.versions(name)):
            with contextlib.suppress(RegistryError):
                manifest = self.manifest(name, version)
                if manifest.job_id == job_id:
                    return manifest
        return None

    # --- writing ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """An exclusive advisory lock on one model (publish + activate are done under it)."""
        directory = self.model_dir(name)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / ".lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def publish(
        self,
        name: str,
        files: dict[str, Path],
        *,
        kind: str,
        inputs: dict[str, list[int]],
        num_classes: int,
        parent: int | None = None,
        data_hash: str | None = None,
        job_id: str | None = None,
        metrics: dict[str, float] | None = None,
        gate: dict[str, Any] | None = None,
        provenance: dict[str, Any] | None = None,
    ) -> Manifest:
        """Copy ``files`` (one per name in ``ARTIFACT_FILES``) into a new immutable version.

        The version is assembled in ``<model>/.tmp-*`` and renamed to the next free number.
        """
        missing = set(ARTIFACT_FILES) - set(files)
        if missing:
            raise RegistryError(f"missing artifact files {sorted(missing)}")
        directory = self.model_dir(name)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            checksums: dict[str, str] = {}
            for file in ARTIFACT_FILES:
                target = tmp / file
                shutil.copyfile(files[file], target)
                with open(target, "rb") as fh:
                    os.fsync(fh.fileno())
                checksums[file] = sha256_file(target)
            for _ in range(100):
                version = (max(self.versions(name), default=0)) + 1
                manifest = Manifest(
                    name=name,
                    version=version,
                    kind=kind,
                    inputs=inputs,
                    num_classes=num_classes,
                    files=checksums,
                    parent=parent,
                    created=datetime.now(UTC).isoformat(timespec="seconds"),
                    data_hash=data_hash,
                    job_id=job_id,
                    metrics=dict(metrics or {}),
                    gate=gate,
                    provenance=dict(provenance or {}),
                )
                atomic_write(tmp / MANIFEST, manifest.to_json())
                try:
                    os.rename(tmp, directory / str(version))  # fails if the number was taken
                except OSError:
                    continue
                fsync_dir(directory)
                log.info("published %s v%d (parent %s, job %s)", name, version, parent, job_id)
                return manifest
            raise RegistryError(f"could not allocate a version number for {name}")
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def activate(self, name: str, version: int, *, expect: int | bool | None = False) -> Manifest:
        """Point ACTIVE at ``version`` after verifying it; with ``expect``, only if ACTIVE still holds it.

        ``expect=False`` means no compare-and-swap; ``expect=None`` means "no active version yet".
        Call under :meth:`lock` when using ``expect``.
        """
        manifest = self.verify(name, version)
        if expect is not False:
            current = self.active(name)
            if current != expect:
                raise ActiveChangedError(f"{name}: ACTIVE is {current}, expected {expect}")
        atomic_write(self.model_dir(name) / ACTIVE, f"{version}\n")
        log.info("activated %s v%d", name, version)
        return manifest

"""The model registry: immutable versions written atomically, ACTIVE flips, corrupt artifacts refused."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from app.serving import load_version
from cama.checkpoint import sha256_file
from harness.stores import clone_store, template_store
from store.artifacts import seed_store
from store.registry import (
    ACTIVE,
    ARTIFACT_FILES,
    ActiveChangedError,
    CorruptVersionError,
    ModelRegistry,
    RegistryError,
    UnknownModelError,
    UnknownVersionError,
)


def fake_files(directory: Path, tag: str) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in ARTIFACT_FILES:
        path = directory / f"{tag}-{name}"
        path.write_bytes(f"{tag}:{name}".encode())
        files[name] = path
    return files


def publish(registry: ModelRegistry, tmp_path: Path, tag: str, **kwargs: object):
    return registry.publish(
        "m",
        fake_files(tmp_path / "src", tag),
        kind="image",
        inputs={"x": [1, 28, 28]},
        num_classes=10,
        **kwargs,
    )


def test_versions_are_numbered_and_carry_lineage(tmp_path):
    registry = ModelRegistry(tmp_path / "store")
    v1 = publish(registry, tmp_path, "a", metrics={"acc": 0.9})
    v2 = publish(registry, tmp_path, "b", parent=1, data_hash="abc", job_id="j1", gate={"accepted": True})
    assert (v1.version, v2.version) == (1, 2)
    assert registry.versions("m") == [1, 2]
    m2 = registry.manifest("m", 2)
    assert m2.parent == 1
    assert m2.data_hash == "abc"
    assert m2.job_id == "j1"
    assert m2.gate == {"accepted": True}
    assert set(m2.files) == {"checkpoint.pt", "model.onnx", "classes.onnx", "replay.npz"}
    assert registry.manifest("m", 1).metrics == {"acc": 0.9}
    assert registry.find_by_job("m", "j1") == m2
    assert registry.find_by_job("m", "nope") is None
    assert registry.models() == ["m"]


def test_temporary_and_incomplete_directories_are_not_versions(tmp_path):
    registry = ModelRegistry(tmp_path / "store")
    publish(registry, tmp_path, "a")
    (registry.model_dir("m") / ".tmp-123").mkdir()
    (registry.model_dir("m") / "7").mkdir()  # a partial version without manifest
    assert registry.versions("m") == [1]
    assert publish(registry, tmp_path, "b").version == 2


def test_active_flips_atomically_with_compare_and_swap(tmp_path):
    registry = ModelRegistry(tmp_path / "store")
    publish(registry, tmp_path, "a")
    publish(registry, tmp_path, "b")
    assert registry.active("m") is None
    registry.activate("m", 1, expect=None)
    assert registry.active("m") == 1
    with pytest.raises(ActiveChangedError):
        registry.activate("m", 2, expect=None)
    registry.activate("m", 2, expect=1)
    assert (registry.model_dir("m") / ACTIVE).read_text() == "2\n"
    assert not [p for p in registry.model_dir("m").iterdir() if p.name.startswith(".ACTIVE")]


def test_unknown_model_and_version(tmp_path):
    registry = ModelRegistry(tmp_path / "store")
    with pytest.raises(UnknownModelError):
        registry.manifest("nope", 1)
    publish(registry, tmp_path, "a")
    with pytest.raises(UnknownVersionError):
        registry.activate("m", 5)
    with pytest.raises(UnknownModelError):
        registry.model_dir("../etc")


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete", "manifest"])
def test_a_damaged_version_is_refused(tmp_path, damage):
    registry = ModelRegistry(tmp_path / "store")
    publish(registry, tmp_path, "a")
    directory = registry.version_dir("m", 1)
    if damage == "flip_byte":
        data = bytearray((directory / "model.onnx").read_bytes())
        data[0] ^= 0xFF
        (directory / "model.onnx").write_bytes(bytes(data))
    elif damage == "truncate":
        (directory / "checkpoint.pt").write_bytes(b"")
    elif damage == "delete":
        (directory / "replay.npz").unlink()
    else:
        (directory / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptVersionError):
        registry.verify("m", 1)
    with pytest.raises(CorruptVersionError):
        registry.activate("m", 1)
    assert registry.active("m") is None


def test_publish_needs_every_artifact(tmp_path):
    registry = ModelRegistry(tmp_path / "store")
    files = fake_files(tmp_path / "src", "a")
    del files["model.onnx"]
    with pytest.raises(RegistryError):
        registry.publish("m", files, kind="image", inputs={}, num_classes=10)
    assert registry.versions("m") == []


# --- real artifacts (a tiny model exported once per test session) -------------------------------


@pytest.fixture(scope="session")
def tiny_template(tmp_path_factory):
    return template_store(tmp_path_factory.getbasetemp() / "tiny_template")


def test_seeded_version_loads_and_records_checksums(tiny_template, tmp_path):
    _, template = tiny_template
    registry = ModelRegistry(clone_store(template, tmp_path / "store"))
    assert registry.active("tiny") == 1
    manifest = registry.verify("tiny", 1)
    assert manifest.kind == "image"
    assert manifest.inputs == {"x": [1, 28, 28]}
    assert manifest.parent is None
    assert manifest.provenance["source_sha256"]
    loaded = load_version(registry, "tiny", 1)
    assert loaded.version == 1
    assert loaded.num_classes == 10


@pytest.mark.parametrize("file", ["model.onnx", "checkpoint.pt"])
def test_corrupted_artifact_is_refused_at_load(tiny_template, tmp_path, file):
    _, template = tiny_template
    store = clone_store(template, tmp_path / "store")
    registry = ModelRegistry(store)
    path = registry.version_dir("tiny", 1) / file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptVersionError, match=re.escape(f"checksum mismatch for {file}")):
        load_version(registry, "tiny", 1)


def test_checksums_match_but_unreadable_onnx_is_refused(tiny_template, tmp_path):
    """A version whose manifest was rewritten to match a broken file still never loads."""
    _, template = tiny_template
    registry = ModelRegistry(clone_store(template, tmp_path / "store"))
    directory = registry.version_dir("tiny", 1)
    (directory / "model.onnx").write_bytes(b"not an onnx model")
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = sha256_file(directory / "model.onnx")
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptVersionError, match=r"cannot open model\.onnx"):
        load_version(registry, "tiny", 1)


def test_seeding_an_empty_store_and_activating_after_a_crash(tiny_template, tmp_path, caplog):
    seed_dir, template = tiny_template
    store = clone_store(template, tmp_path / "store")
    registry = ModelRegistry(store)
    (registry.model_dir("tiny") / ACTIVE).unlink()  # published but never activated
    with caplog.at_level(logging.INFO):
        assert seed_store(registry, ["tiny"], seed_dir) == {}
    assert registry.active("tiny") == 1
    assert registry.versions("tiny") == [1]
    problems = seed_store(registry, ["absent"], seed_dir)
    assert "no seed files" in problems["absent"]
    shutil.rmtree(store / "tiny")
    assert registry.active("tiny") is None

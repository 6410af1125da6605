"""Every command-line entry point of the service, smoke-run with the cheapest settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from harness.processes import ROOT, service_env
from harness.stores import clone_store, make_measurement_seed_dir, template_store
from store.data import ServingData
from store.registry import ModelRegistry
from training.data import resolve_data_dir


def run(args: list[str], timeout: float = 600, **settings: object) -> subprocess.CompletedProcess[str]:
    env = service_env(**settings)
    env.setdefault("CAMA_DATA_DIR", str(resolve_data_dir().resolve()))
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return template_store(tmp_path_factory.getbasetemp() / "tiny_template")


def test_export_model_publishes_a_checkpoint(tmp_path):
    seed = make_measurement_seed_dir(tmp_path / "seed", "meas")
    out = run([
        "training.export_model", "--checkpoint", str(seed / "meas_cama.pt"), "--name", "meas",
        "--store", str(tmp_path / "store"), "--serving-data", str(seed / "meas_serving_data.npz"),
    ])  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout[out.stdout.index("{") :])["version"] == 1
    registry = ModelRegistry(tmp_path / "store")
    assert registry.active("meas") == 1
    assert registry.verify("meas", 1).kind == "measurement"


@pytest.mark.parametrize(("dataset", "shape"), [("mnist", (1, 28, 28)), ("cifar_binary", (3, 32, 32))])
def test_export_model_builds_image_serving_data(tmp_path, dataset, shape):
    target = tmp_path / f"{dataset}_serving_data.npz"
    out = run(
        [
            "training.export_model",
            *("--make-serving-data", dataset, "--out", str(target), "--canary", "10", "--replay", "20"),
        ]
    )
    assert out.returncode == 0, out.stderr[-2000:]
    with np.load(target) as d:
        assert d["canary_x"].shape == (10, *shape)
        assert d["canary_x"].dtype == np.uint8
        assert d["replay_x"].shape == (20, *shape)
        classes = 10 if dataset == "mnist" else 2
        assert set(np.unique(d["replay_y"])) <= set(range(classes))
    assert ServingData.load(target).canary.x.shape == (10, *shape)


def test_committed_mnist_serving_data_is_small_and_labelled():
    path = ROOT / "models" / "mnist_serving_data.npz"
    assert path.stat().st_size < 5 << 20
    with np.load(path) as d:
        assert d["canary_x"].shape == (1000, 28, 28)
        assert d["replay_x"].shape == (2000, 28, 28)
        assert len(np.unique(d["canary_y"])) == 10


def test_seed_command(tiny, tmp_path):
    seed_dir, template = tiny
    store = clone_store(template, tmp_path / "store")
    ok = run(["app.seed"], model_store=str(store), seed_dir=str(seed_dir), models=["tiny"])
    assert ok.returncode == 0, ok.stderr[-2000:]
    missing = run(["app.seed"], model_store=str(store), seed_dir=str(seed_dir), models=["absent"])
    assert missing.returncode == 1
    assert "no seed files" in missing.stderr


def test_the_service_refuses_unsafe_production_settings():
    out = run(["app"], timeout=120, environment="production")
    assert out.returncode == 2
    assert "CAMA_TOKEN must be set" in out.stderr


def test_onnx_vs_torch_benchmark(tiny, tmp_path):
    _, template = tiny
    out = run([
        "benchmarks.onnx_vs_torch", "--store", str(template), "--model", "tiny", "--n", "8", "--k", "1", "3",
        "--no-metrics", "--results-dir", str(tmp_path),
    ])  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "onnx_vs_torch.json").read_text())
    assert report["max_abs_diff"] < 0.05
    assert all(row["label_agreement"] == 1.0 for row in report["per_k"])


def test_microbatch_benchmark(tiny, tmp_path):
    _, template = tiny
    out = run([
        "benchmarks.microbatch", "--store", str(template), "--model", "tiny", "--requests", "16",
        "--concurrency", "4", "--k", "2", "--no-metrics",
        "--results-dir", str(tmp_path), "--log-dir", str(tmp_path),
    ])  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads((tmp_path / "microbatch.json").read_text())
    assert report["throughput_ratio"] > 0
    assert report["results"]["one_at_a_time"]["mean_batch_inputs"] == 1.0
    assert "throughput ratio" in out.stdout
    assert os.path.exists(tmp_path / "microbatch_on.log")

"""ONNX Runtime and torch agree given the same noise (eq. 6 log-weights), for images and measurement data."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from app.data import Inputs
from app.registry import Manifest, ModelRegistry
from app.serving import LoadedVersion, load_version
from app.testing import digit_like_images, template_store
from cama.export import OPSET, export_onnx
from cama.measurement_model import MeasurementCama, MeasurementCamaConfig

TOLERANCE_NATS = 0.05


@pytest.fixture(scope="session")
def tiny_template(tmp_path_factory):
    return template_store(tmp_path_factory.getbasetemp() / "tiny_template")


def assert_parity(version, inputs: Inputs, k: int, seed: int) -> float:
    noise = version.noise(len(inputs), k, seed)
    onnx_w = version.log_weights(inputs, noise, "onnx")
    torch_w = version.log_weights(inputs, noise, "torch")
    assert onnx_w.shape == torch_w.shape == (len(inputs), version.num_classes)
    assert np.isfinite(onnx_w).all()
    diff = float(np.abs(onnx_w - torch_w).max())
    assert diff < TOLERANCE_NATS
    np.testing.assert_array_equal(onnx_w.argmax(1), torch_w.argmax(1))
    return diff


@pytest.mark.parametrize(("batch", "k"), [(1, 1), (3, 4), (17, 10), (64, 2)])
def test_transform_pathway_image_model_parity(tiny_template, batch, k):
    """The served artifact (the transform pathway: affine_grid/grid_sample, shifted-sum blur)."""
    _, store = tiny_template
    version = load_version(ModelRegistry(store), "tiny", 1)
    images, _ = digit_like_images(batch, seed=batch)
    assert_parity(version, Inputs(images[:, None].astype(np.float32) / 255.0), k, seed=batch * 7 + k)


def test_graph_has_opset_and_dynamic_batch_and_k(tiny_template):
    _, store = tiny_template
    graph = onnx.load(str(ModelRegistry(store).version_dir("tiny", 1) / "model.onnx"))
    assert max(op.version for op in graph.opset_import if op.domain in ("", "ai.onnx")) >= 17
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input
    }
    assert dims["x"] == ["batch", 1, 28, 28]
    assert dims["noise_m"][:2] == ["k", "batch"]
    assert dims["noise_z"][1:3] == ["k", "batch"]
    assert OPSET >= 17


def test_measurement_model_parity(tmp_path):
    torch.manual_seed(0)
    model = MeasurementCama(MeasurementCamaConfig.tiny()).eval()
    with torch.no_grad():  # move the affine mechanism off the identity
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 10), (torch.randn(2, 5), torch.randn(2, 5)))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x", "a", "c", "noise_m", "noise_z"]
    manifest = Manifest("m", 1, "measurement", {"x": [10], "a": [5], "c": [5]}, 5, {})
    version = LoadedVersion(manifest, session, model)
    rng = np.random.default_rng(0)
    for batch, k in [(1, 1), (9, 5)]:
        inputs = Inputs(
            rng.standard_normal((batch, 10), dtype=np.float32),
            (
                rng.standard_normal((batch, 5), dtype=np.float32),
                rng.standard_normal((batch, 5), dtype=np.float32),
            ),
        )
        assert_parity(version, inputs, k, seed=k)

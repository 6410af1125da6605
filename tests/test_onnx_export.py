"""ONNX Runtime and torch agree given the same noise (eq. 6 log-weights), for images and measurement data."""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from app.serving import LoadedVersion, load_version
from cama.export import OPSET, export_onnx
from cama.measurement_model import MeasurementCama, MeasurementCamaConfig
from cama.mechanisms import PROB_EPS, _affine, _affine_grid, apply_mechanisms, bernoulli_mean
from harness.inputs import digit_like_images
from harness.stores import template_store
from store.data import Inputs
from store.registry import Manifest, ModelRegistry

TOLERANCE_NATS = 0.05


@pytest.fixture(scope="session")
def tiny_template(tmp_path_factory):
    return template_store(tmp_path_factory.getbasetemp() / "tiny_template")


def assert_parity(version, inputs: Inputs, k: int, seed: int, screen: float | None = None) -> float:
    noise = version.noise(len(inputs), k, seed)
    onnx_w = version.log_weights(inputs, noise, "onnx", screen=screen)
    torch_w = version.log_weights(inputs, noise, "torch", screen=screen)
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
    inputs = Inputs(images[:, None].astype(np.float32) / 255.0)
    assert_parity(version, inputs, k, seed=batch * 7 + k)
    assert_parity(version, inputs, k, seed=batch * 7 + k, screen=float("inf"))  # via classes.onnx


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


@pytest.mark.parametrize("coparents", ["mlp", "mlp_quadratic"])
def test_measurement_model_parity(tmp_path, coparents):
    torch.manual_seed(0)
    model = MeasurementCama(MeasurementCamaConfig.tiny(coparent_mechanism=coparents)).eval()
    with torch.no_grad():  # move the affine mechanism off the identity
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 10), (torch.randn(2, 5), torch.randn(2, 5)))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x", "a", "c", "noise_m", "noise_z"]
    example = (torch.randn(2, 10), (torch.randn(2, 5), torch.randn(2, 5)))
    classes_path = export_onnx(model, tmp_path / "c.onnx", *example, one_class=True)
    classes = ort.InferenceSession(str(classes_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in classes.get_inputs()] == ["x", "a", "c", "labels", "noise_m", "noise_z"]
    dims = {i.name: list(i.shape) for i in classes.get_inputs()}
    assert dims["labels"] == ["s", "batch"]
    assert dims["noise_z"][:3] == ["s", "k", "batch"]
    manifest = Manifest("m", 1, "measurement", {"x": [10], "a": [5], "c": [5]}, 5, {})
    version = LoadedVersion(manifest, session, model, classes)
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
        assert_parity(version, inputs, k, seed=k, screen=float("inf"))  # every class via classes.onnx


def _ort_run(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], path) -> list[np.ndarray]:
    """Export ``module`` (fixed shapes) and run it in ONNX Runtime on the same inputs."""
    names = [f"in{i}" for i in range(len(inputs))]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporter's own deprecation warnings (as export_onnx does)
        torch.onnx.export(
            module.eval(), inputs, str(path), input_names=names, opset_version=OPSET, dynamo=True
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return list(session.run(None, {n: t.numpy() for n, t in zip(names, inputs, strict=True)}))


class _LogBernoulli(torch.nn.Module):
    def forward(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = bernoulli_mean(logits)
        return torch.log(p), torch.log1p(-p)


class _Warp(torch.nn.Module):
    def forward(self, img: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return apply_mechanisms(img, {"warp": theta}, blur_kernel=5)


def test_bernoulli_mean_is_sigmoid_and_exact_in_onnx_runtime(tmp_path):
    """The likelihood's probabilities: no ``Sigmoid`` op (ONNX Runtime's is ~1e-7 absolute, 2% of 1e-6)."""
    logits = torch.linspace(-30.0, 30.0, 6001)
    exact = torch.sigmoid(logits.double())
    p = bernoulli_mean(logits)
    assert torch.allclose(p.double(), exact, rtol=3e-7, atol=0.0)
    grad_at = torch.tensor([-1000.0, -50.0, -1.0, 0.0, 1.0, 50.0, 1000.0], requires_grad=True)
    bernoulli_mean(grad_at).sum().backward()
    expected = torch.sigmoid(grad_at.detach()) * torch.sigmoid(-grad_at.detach())
    assert grad_at.grad is not None
    torch.testing.assert_close(grad_at.grad, expected, rtol=1e-6, atol=0.0)
    log_p, log_q = _ort_run(_LogBernoulli(), (logits,), tmp_path / "p.onnx")
    graph = onnx.load(str(tmp_path / "p.onnx"))
    assert "Sigmoid" not in {node.op_type for node in graph.graph.node}
    ref_p, ref_q = (t.numpy() for t in _LogBernoulli()(logits))
    np.testing.assert_allclose(log_p, ref_p, rtol=0, atol=1e-5)  # where p is tiny, log p to 1e-5 nats
    np.testing.assert_allclose(log_q, ref_q, rtol=0, atol=1e-5)


def test_warp_grid_is_affine_grid_and_the_same_in_onnx_runtime(tmp_path):
    """The warp's grid: ``F.affine_grid``'s values, the identity exact, torch and ONNX Runtime alike."""
    gen = torch.Generator().manual_seed(0)
    theta = 0.2 * torch.randn(8, 6, generator=gen)
    theta[0] = 0.0  # the identity (every mechanism starts there)
    affine = _affine(theta)
    reference = torch.nn.functional.affine_grid(affine, [8, 1, 28, 28], align_corners=False)
    torch.testing.assert_close(_affine_grid(affine, 28, 28), reference, rtol=0, atol=1e-6)
    img = torch.rand(8, 1, 28, 28, generator=gen)
    warped = _Warp()(img, theta)
    # grid_sample's unnormalisation rounds, so the identity is a no-op to ~1e-6, not exactly
    torch.testing.assert_close(warped[0], img[0].clamp(PROB_EPS, 1 - PROB_EPS), rtol=0, atol=2e-6)
    (onnx_warped,) = _ort_run(_Warp(), (img, theta), tmp_path / "warp.onnx")
    np.testing.assert_allclose(onnx_warped, warped.numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("field_inverse", "scale"), [("divide", 0.05), ("mask", 20.0)])
def test_field_mechanism_exports_with_parity(tmp_path, field_inverse, scale):
    """The spatial field mechanism (a fixed bilinear upsampling as matrix products) in ONNX Runtime,
    with covered pixels divided back or, past the visibility floor, read as missing."""
    from cama.config import ImageCamaConfig
    from cama.export import export_onnx
    from cama.image_model import ImageCama, with_m_pathway
    from cama.mechanisms import MASK_VISIBILITY, _field_maps
    from cama.objectives import Noise, bayes_log_weights

    torch.manual_seed(0)
    transforms = ("warp", "blur", "photometric", "outlier", "field", "clean")
    model = with_m_pathway(
        ImageCama(ImageCamaConfig.tiny()), "transform", transforms=transforms, field_inverse=field_inverse
    )
    with torch.no_grad():
        assert model.mechanisms is not None
        model.mechanisms.head.weight.normal_(0.0, 0.05)
        model.q_m_mlp[-1].weight.normal_(0.0, 0.05 if field_inverse == "divide" else 1.0)
        start = sum(model.mechanisms.sizes[t] for t in transforms[: transforms.index("field")])
        model.mechanisms.head.weight[start : start + 49].normal_(0.0, scale)  # the field's weight map
    model.eval()
    images, _ = digit_like_images(5, seed=3)
    x = torch.from_numpy(images[:, None].astype(np.float32) / 255.0)
    if field_inverse == "mask":  # some pixels lie past the floor, so the masked branch is exercised
        with torch.no_grad():
            weight, _ = _field_maps(model.mechanisms(model.infer_m(x)[0])["field"], 1, 28, 28)
        assert bool((1.0 - weight < MASK_VISIBILITY).any())
    path = export_onnx(model, tmp_path / "field.onnx", x)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(1)
    noise_m = torch.randn(3, 5, model.dim_m, generator=gen)
    noise_z = torch.randn(model.num_classes, 3, 5, model.dim_z, generator=gen)
    with torch.no_grad():
        expected = bayes_log_weights(model, x, noise=Noise(noise_m, noise_z)).numpy()
    got = session.run(
        ["log_weights"], {"x": x.numpy(), "noise_m": noise_m.numpy(), "noise_z": noise_z.numpy()}
    )[0]
    assert float(np.abs(got - expected).max()) < TOLERANCE_NATS
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))


def test_served_screen_matches_the_torch_screen(tiny_template):
    """``LoadedVersion.log_weights(screen=...)`` is the core's screened rule on ONNX Runtime."""
    from cama.objectives import Noise, bayes_log_weights

    _, store = tiny_template
    version = load_version(ModelRegistry(store), "tiny", 1)
    images, _ = digit_like_images(12, seed=4)
    inputs = Inputs(images[:, None].astype(np.float32) / 255.0)
    noise = version.noise(len(inputs), 5, seed=9)
    first = version.log_weights(inputs, type(noise)(noise.m[:1], noise.z[:, :1]), "onnx")
    top2 = np.sort(first, axis=1)[:, -2:]
    margin = float(np.median(top2[:, 1] - top2[:, 0]))
    served = version.log_weights(inputs, noise, "onnx", screen=margin)
    with torch.no_grad():
        reference = bayes_log_weights(
            version.model,
            torch.from_numpy(inputs.x),
            noise=Noise(torch.from_numpy(noise.m), torch.from_numpy(noise.z)),
            screen=margin,
        ).numpy()
    assert float(np.abs(served - reference).max()) < TOLERANCE_NATS
    np.testing.assert_array_equal(served.argmax(1), reference.argmax(1))

"""Image CAMA on any C x H x W: the CIFAR-binary shapes (3 x 32 x 32) through the core, the
appendix-C CIFAR preset, RGB mechanisms, and the MNIST model left exactly as it was."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cama import adapt
from cama import objectives as O
from cama.checkpoint import load_checkpoint, save_checkpoint
from cama.config import ImageCamaConfig, Transform
from cama.export import export_onnx
from cama.image_model import ImageCama, with_m_pathway
from cama.mechanisms import apply_mechanisms, canonicalize, param_sizes
from cama.protocol import all_classes
from tests.helpers import brute_force_log_weights, check_selective_steps

REPO = Path(__file__).resolve().parents[1]
RGB = (3, 32, 32)
# eq. 6 log-weights of models/mnist_cama_clean.pt (additive) and models/mnist_cama.pt (transform)
# on the first two fixed inputs of test_mnist_config_and_checkpoints_are_unchanged, computed with
# the MNIST-only code
MNIST_CLEAN_REFERENCE = [
    [
        -3007.007,
        -2960.553,
        -2693.915,
        -2699.323,
        -2641.624,
        -2774.950,
        -2638.003,
        -2525.940,
        -2759.518,
        -2517.972,
    ],
    [
        -2930.629,
        -2862.213,
        -2535.746,
        -2646.598,
        -2532.309,
        -2740.030,
        -2522.297,
        -2456.642,
        -2674.960,
        -2462.116,
    ],
]
MNIST_SERVED_REFERENCE = [
    [-552.502, -550.463, -552.691, -549.584, -551.236, -549.283, -550.487, -553.658, -550.796, -551.798],
    [-553.420, -554.019, -554.341, -551.586, -550.989, -552.896, -549.790, -553.282, -550.186, -552.150],
]


def tiny_rgb(pathway: str = "additive", *, share_encoder: bool = True, seed: int = 0) -> ImageCama:
    """A tiny 3 x 32 x 32, 2-class model with the CIFAR structure (shared q CNN, deeper q MLPs, a
    stride-1 deconvolution), moved off its initial symmetries so every path is exercised."""
    torch.manual_seed(seed)
    config = ImageCamaConfig.tiny(
        num_classes=2,
        image_size=32,
        channels=3,
        q_m_depth=2,
        z_head_depth=2,
        share_encoder=share_encoder,
        decoder_stride1_layers=1,
    )
    model = ImageCama(config)
    if pathway == "transform":
        model = with_m_pathway(model, "transform")
        with torch.no_grad():
            assert model.mechanisms is not None
            model.mechanisms.head.weight.normal_(0.0, 0.05)
    with torch.no_grad():
        last = model.q_m_mlp[-1]
        assert isinstance(last, torch.nn.Linear)
        last.weight.normal_(0.0, 0.05)
        last.bias[model.dim_m :] = -1.0
        model.q_z_in_m.weight.normal_(0.0, 0.1)
    return model.eval()


def rgb_batch(n: int = 5, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, *RGB, generator=gen), torch.randint(0, 2, (n,), generator=gen)


@pytest.mark.parametrize("pathway", ["additive", "transform"])
@pytest.mark.parametrize("share_encoder", [True, False])
def test_rgb_forward_and_elbos(pathway: str, share_encoder: bool) -> None:
    model = tiny_rgb(pathway, share_encoder=share_encoder)
    x, y = rgb_batch()
    m = torch.zeros(2, 5, model.dim_m)
    ctx = model.prepare(x, m)
    ys = all_classes(2)
    z = torch.zeros(2, 2, 5, model.dim_z)
    assert model.canonical_logits(ys, z, m).shape == (2, 2, 5, *RGB)
    assert model.mean_image(ctx, ys, z).shape == (2, 2, 5, *RGB)
    for value in (
        O.intervention_elbo(model, x, y),
        O.labelled_joint_elbo(model, x, y),
        O.marginal_elbo(model, x),
    ):
        assert value.shape == (5,)
        assert torch.isfinite(value).all()
        assert (value < 0).all()
    loss = -O.augmented_objective(model.train(), (x, y), (x, y), 0.5)
    torch.autograd.backward(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("pathway", ["additive", "transform"])
def test_rgb_bayes_rule_matches_brute_force_and_sums_to_one(pathway: str) -> None:
    model = tiny_rgb(pathway)
    x, _ = rgb_batch(3, seed=5)
    noise = O.sample_noise(model, 3, 3, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        batched = O.bayes_log_weights(model, x, noise=noise)
        brute = brute_force_log_weights(model, x, noise)
        pred = O.bayes_predict(model, x, k=3, generator=torch.Generator().manual_seed(7))
    assert batched.shape == (3, 2)
    torch.testing.assert_close(batched, brute, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(pred.probs.sum(1), torch.ones(3))
    assert set(pred.labels.tolist()) <= {0, 1}


@pytest.mark.parametrize("pathway", ["additive", "transform"])
def test_rgb_selective_finetune_moves_only_the_m_networks_and_resets(pathway: str) -> None:
    model = tiny_rgb(pathway).train()
    selected = {id(p) for p in adapt.collect_params(model)}
    names = {n for n, p in model.named_parameters() if id(p) in selected}
    assert "q_z_in_m.weight" in names
    assert any(n.startswith("q_m_cnn.") for n in names)  # NN_M^q's CNN, shared with NN_Z^q here
    assert any(n.startswith("nn_m." if pathway == "additive" else "mechanisms.") for n in names)
    assert not any(
        n.startswith(("nn_y.", "nn_z.", "merge.", "q_z_in_x.", "q_z_hidden.", "q_z_out.")) for n in names
    )
    before = check_selective_steps(model, rgb_batch(6, seed=2), rgb_batch(6, seed=3)[0], steps=2)
    adapt.reset(model, before)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("pathway", ["additive", "transform"])
def test_rgb_checkpoint_round_trip_gives_identical_outputs(tmp_path: Path, pathway: str) -> None:
    model = tiny_rgb(pathway)
    path = tmp_path / "rgb.pt"
    save_checkpoint(path, model)
    loaded, meta = load_checkpoint(path)
    assert isinstance(loaded, ImageCama)
    assert loaded.config == model.config
    assert meta.config["channels"] == 3
    x, _ = rgb_batch(4, seed=8)
    noise = O.sample_noise(model, 4, 2, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(
            O.bayes_log_weights(model, x, noise=noise), O.bayes_log_weights(loaded, x, noise=noise)
        )


def test_non_square_images_and_other_sizes() -> None:
    for channels, size in ((2, (20, 36)), (1, 64), (3, 28)):
        model = ImageCama(ImageCamaConfig.tiny(channels=channels, image_size=size, num_classes=3)).eval()
        c, h, w = model.config.image_shape
        x = torch.rand(2, c, h, w)
        with torch.no_grad():
            assert O.bayes_log_weights(model, x, k=2).shape == (2, 3)


def test_cifar_preset_follows_appendix_c() -> None:
    config = ImageCamaConfig.cifar_binary()
    assert config.image_shape == (3, 32, 32)
    assert (config.num_classes, config.dim_z, config.dim_m) == (2, 128, 64)
    model = ImageCama(config)

    def widths(module: torch.nn.Module) -> list[int]:
        return [m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear)]

    assert widths(model.nn_y) == [1000, 1000]
    assert widths(model.nn_z) == [1000, 1000]
    assert widths(model.nn_m) == [1000, 1000, 1000]
    assert model.merge.seed_size == (4, 4)
    deconvs = [m for m in model.merge.deconv if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [(d.out_channels, d.stride) for d in deconvs] == [
        (64, (1, 1)),
        (64, (2, 2)),
        (64, (2, 2)),
        (3, (2, 2)),
    ]
    convs = [m for m in model.q_m_cnn.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (3, 64, (3, 3)),
        (64, 64, (3, 3)),
        (64, 64, (3, 3)),
    ]
    assert [(m.in_features, m.out_features) for m in model.q_m_mlp if isinstance(m, torch.nn.Linear)] == [
        (4 * 4 * 64, 1000),
        (1000, 1000),
        (1000, 2 * 64),
    ]
    assert model.q_z_cnn is None  # NN_Z^q reuses NN_M^q's CNN
    assert model.q_z_in_x.in_features == 4 * 4 * 64
    assert widths(model.q_z_hidden) == [1000]
    assert model.q_z_out.out_features == 2 * 128
    with torch.no_grad():
        logits = model.canonical_logits(all_classes(2), torch.zeros(2, 1, 1, 128), torch.zeros(1, 1, 64))
    assert logits.shape == (2, 1, 1, *RGB)


def test_rgb_mechanisms_are_the_identity_at_zero_and_per_channel() -> None:
    sizes = param_sizes(3)
    assert (sizes["photometric"], sizes["outlier"], sizes["field"]) == (6, 4, 4 * 49)
    assert param_sizes(1)["photometric"] == 2  # greyscale keeps the MNIST sizes
    p = torch.rand(2, *RGB).clamp(0.05, 0.95)
    zero: dict[Transform, torch.Tensor] = {
        n: torch.zeros(2, size) for n, size in sizes.items() if n != "clean"
    }
    torch.testing.assert_close(apply_mechanisms(p, zero, 5), p)
    theta = torch.zeros(2, 6)
    theta[:, 0] = 0.3  # red gain only
    theta[:, 5] = -0.1  # blue offset only
    out = apply_mechanisms(p, {"photometric": theta}, 5)
    torch.testing.assert_close(out[:, 1], p[:, 1])
    torch.testing.assert_close(out[:, 0], (p[:, 0] * math.exp(0.3)).clamp(max=1 - 1e-6))
    torch.testing.assert_close(out[:, 2], (p[:, 2] - 0.1).clamp(min=1e-6))
    x = torch.rand(2, *RGB) * 0.5 + 0.25
    back = canonicalize(
        apply_mechanisms(x, {"photometric": theta * 0.5}, 5), {"photometric": theta * 0.5}, None
    )
    torch.testing.assert_close(back, x)


def test_mnist_config_and_checkpoints_are_unchanged() -> None:
    """The 28 x 28 greyscale model: old configs (without the new fields) load strictly, and the
    served checkpoints give the log-weights the MNIST-only code gave (fixed inputs and noise). The
    served model's last stage changed its inference settings only (configs/mnist.toml "occluder"):
    with the exact field inverse it gives the reference log-weights, so no weight changed."""
    default = ImageCama(ImageCamaConfig())
    assert ImageCamaConfig().image_shape == (1, 28, 28)
    assert default.q_z_cnn is not None
    assert not list(default.q_z_hidden.parameters())
    expected = {  # first two images, computed before images of other shapes were supported
        "models/mnist_cama_clean.pt": MNIST_CLEAN_REFERENCE,
        "models/mnist_cama.pt": MNIST_SERVED_REFERENCE,
    }
    for name, reference in expected.items():
        payload = torch.load(REPO / name, weights_only=True)
        model, _ = load_checkpoint(REPO / name)
        assert isinstance(model, ImageCama)
        if name == "models/mnist_cama_clean.pt":
            assert "channels" not in payload["config"]  # written before the field existed
        else:
            assert (payload["config"]["field_inverse"], payload["config"]["theta_prior_std"]) == ("mask", 0.1)
            model.config = replace(model.config, field_inverse="divide", theta_prior_std=None)
        assert set(model.state_dict()) == set(payload["state_dict"])
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(4, 1, 28, 28, generator=gen)
        noise = O.sample_noise(model, 4, 3, generator=gen)
        with torch.no_grad():
            got = O.bayes_log_weights(model, x, noise=noise)[:2]
        torch.testing.assert_close(got, torch.tensor(reference), atol=1e-2, rtol=1e-5)


@pytest.mark.parametrize("pathway", ["additive", "transform"])
def test_rgb_onnx_export_matches_torch(tmp_path: Path, pathway: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = tiny_rgb(pathway)
    x, _ = rgb_batch(4, seed=10)
    path = export_onnx(model, tmp_path / "rgb.onnx", x)
    noise = O.sample_noise(model, 3, 2, generator=torch.Generator().manual_seed(11))
    noise_m = noise.m.numpy()
    noise_z = noise.z.numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x[:3].numpy(), "noise_m": noise_m, "noise_z": noise_z})
    with torch.no_grad():
        want = O.bayes_log_weights(model, x[:3], noise=noise)
    assert got.shape == (3, 2)
    torch.testing.assert_close(torch.from_numpy(got), want, atol=0.05, rtol=1e-4)

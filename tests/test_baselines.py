"""Discriminative baselines: shapes, gradients, learning, checkpoints and the training CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cama.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cama.config import ImageCamaConfig
from cama.image_model import ImageCama
from training.baselines import (
    BASELINES,
    BNCNN,
    DNN,
    BaselineConfigError,
    BNCNNConfig,
    DNNConfig,
    PoolCNN,
    SmallCNN,
    build_baseline,
    evaluate_accuracy,
    load_baseline,
    save_baseline,
)
from training.data import DataError, Mnist, Split, load_mnist, resolve_data_dir
from training.train_baseline import (
    TrainConfig,
    augmented_batch,
    evaluate_checkpoint,
    main,
    tent_halves,
)

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = str(resolve_data_dir())


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors run fastest on one thread (and do not fight a training job for the cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def mnist_small() -> Mnist:
    """512 training and 400 test images of the real MNIST."""
    try:
        mnist = load_mnist(DATA_DIR)
    except DataError as exc:
        pytest.skip(f"MNIST not available: {exc}")
    return Mnist(
        train=Split(mnist.train.x[:512], mnist.train.y[:512]),
        test=Split(mnist.test.x[:400], mnist.test.y[:400]),
        checksum=mnist.checksum,
    )


def classes_of(model: torch.nn.Module) -> int:
    """The number of logits the baseline's config names."""
    return int(cast(Any, model).config.num_classes)


def images_for(model: torch.nn.Module, n: int) -> torch.Tensor:
    """Random images of the shape the baseline's config names (MNIST's unless it says otherwise)."""
    cfg = cast(Any, model).config
    side = getattr(cfg, "image_size", 28)
    return torch.rand(n, getattr(cfg, "in_channels", 1), side, side)


@pytest.mark.parametrize("kind", sorted(BASELINES))
def test_output_shape_and_finite(kind: str) -> None:
    torch.manual_seed(0)
    model = build_baseline(kind)
    x = images_for(model, 5)
    for mode in (True, False):
        model.train(mode)
        logits = model(x)
        assert logits.shape == (5, classes_of(model))
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("kind", sorted(BASELINES))
def test_every_parameter_gets_a_gradient(kind: str) -> None:
    torch.manual_seed(0)
    model = build_baseline(kind).train()
    labels = torch.arange(8) % classes_of(model)
    torch.autograd.backward(F.cross_entropy(model(images_for(model, 8)), labels))
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


def test_architectures_follow_the_paper() -> None:
    dnn = DNN()
    widths = [m.out_features for m in dnn.modules() if isinstance(m, torch.nn.Linear)]
    rates = [m.p for m in dnn.modules() if isinstance(m, torch.nn.Dropout)]
    assert widths == [512, 256, 126, 512, 10]
    assert rates == [0.25, 0.25, 0.25, 0.5]
    convs = [m for m in SmallCNN().modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64]
    bn = BNCNN()
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in bn.modules()) == 3
    assert not any(isinstance(m, torch.nn.Dropout) for m in bn.modules())
    cifar = PoolCNN()  # appendix C, CIFAR-binary: 3 x conv3x3 128 + pool, MLP [4*4*128, 1000, 1000]
    convs = [m for m in cifar.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (3, 128, (3, 3)),
        (128, 128, (3, 3)),
        (128, 128, (3, 3)),
    ]
    dense = [(m.in_features, m.out_features) for m in cifar.modules() if isinstance(m, torch.nn.Linear)]
    assert dense == [(4 * 4 * 128, 1000), (1000, 1000), (1000, 2)]


def test_config_rejects_mismatched_dropout() -> None:
    with pytest.raises(ValueError, match="dropout"):
        DNNConfig(hidden=(8, 8), dropout=(0.5,))


@pytest.mark.parametrize("kind", ["dnn", "bncnn"])
def test_a_few_steps_reduce_the_loss(kind: str, mnist_small: Mnist) -> None:
    torch.manual_seed(0)
    model = build_baseline(kind, None if kind == "dnn" else {"channels": [8, 16, 16]})
    x, y = torch.from_numpy(mnist_small.train.x[:256]), torch.from_numpy(mnist_small.train.y[:256])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3 if kind == "dnn" else 1e-2)
    model.train()
    first = F.cross_entropy(model(x), y).item()
    for _ in range(15):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        torch.autograd.backward(loss)
        opt.step()
    assert loss.item() < 0.8 * first


@pytest.mark.parametrize("kind", sorted(BASELINES))
def test_checkpoint_round_trip_gives_identical_outputs(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_baseline(kind)
    model.train()
    with torch.no_grad():
        model(images_for(model, 16))  # moves BatchNorm running statistics off their defaults
    model.eval()
    path = tmp_path / f"{kind}.pt"
    digest = save_baseline(path, model, provenance={"data_sha256": "abc"}, metrics={"val_accuracy": 0.5})
    assert len(digest) == 64
    assert not list(tmp_path.glob(".*.tmp"))
    assert path.stat().st_mode & 0o777 == 0o644
    loaded, meta = load_baseline(path)
    assert type(loaded) is type(model)
    assert not loaded.training
    assert meta.kind == kind
    assert meta.provenance["data_sha256"] == "abc"
    assert "git_commit" in meta.provenance
    assert meta.metrics == {"val_accuracy": 0.5}
    x = images_for(model, 7)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_checkpoint_keeps_a_non_default_config(tmp_path: Path) -> None:
    model = BNCNN(BNCNNConfig(channels=(4, 8)))
    save_baseline(tmp_path / "m.pt", model)
    loaded, meta = load_baseline(tmp_path / "m.pt")
    assert loaded.config == model.config
    assert meta.config["channels"] == [4, 8]


def test_load_refuses_bad_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_baseline(garbage)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}, "schema_version": 1, "config": {"kind": "resnet"}}, other)
    with pytest.raises(CheckpointError, match="unknown model kind"):
        load_baseline(other)
    cama = tmp_path / "cama.pt"
    save_checkpoint(cama, ImageCama(ImageCamaConfig.tiny()))
    with pytest.raises(CheckpointError, match="not a baseline"):
        load_baseline(cama)
    with pytest.raises(BaselineConfigError, match="unknown fields"):
        build_baseline("dnn", {"kind": "dnn", "width": 3})


def test_baselines_are_core_checkpoints(tmp_path: Path) -> None:
    """One checkpoint format: a baseline loads with the core's loader too."""
    model = build_baseline("dnn")
    save_baseline(tmp_path / "dnn.pt", model)
    loaded, meta = load_checkpoint(tmp_path / "dnn.pt")
    assert type(loaded) is type(model)
    assert meta.kind == "dnn"
    for shipped in ("models/mnist_dnn.pt", "models/mnist_bncnn.pt", "models/mnist_bncnn_flat.pt"):
        assert load_checkpoint(REPO / shipped)[1].kind in BASELINES


def test_augmented_batch_adds_a_manipulated_copy() -> None:
    x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    y = np.arange(4)
    cfg = TrainConfig(augment="vshift", aug_range=0.5)
    xa, ya = augmented_batch(x, y, cfg, np.random.default_rng(0))
    assert xa.shape == (8, 1, 28, 28)
    assert ya.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert torch.equal(xa[:4], torch.from_numpy(x))
    xc, _ = augmented_batch(x, y, TrainConfig(), np.random.default_rng(0))
    assert xc.shape == (4, 1, 28, 28)


def test_flip_mirrors_some_images_left_right_and_keeps_labels() -> None:
    x = np.random.default_rng(0).random((64, 3, 4, 4), dtype=np.float32)
    y = np.arange(64)
    xf, yf = augmented_batch(x, y, TrainConfig(flip=True), np.random.default_rng(0))
    mirrored = [bool(torch.equal(xf[i], torch.from_numpy(x[i, :, :, ::-1].copy()))) for i in range(64)]
    kept = [bool(torch.equal(xf[i], torch.from_numpy(x[i]))) for i in range(64)]
    assert all(a or b for a, b in zip(mirrored, kept, strict=True))
    assert 10 < sum(mirrored) < 54
    assert yf.tolist() == y.tolist()


def test_tent_halves_split_the_test_set() -> None:
    adapt, held_out = tent_halves(10000, seed=0)
    assert len(adapt) == len(held_out) == 5000
    assert not set(adapt.tolist()) & set(held_out.tolist())
    assert np.array_equal(np.concatenate([adapt, held_out]), np.random.default_rng(0).permutation(10000))


def test_evaluate_checkpoint_reports_tent_for_bn_models(tmp_path: Path, mnist_small: Mnist) -> None:
    torch.manual_seed(0)
    model = BNCNN(BNCNNConfig(channels=(4, 8, 8)))
    path = tmp_path / "bn.pt"
    save_baseline(path, model, metrics={"val_accuracy": 0.1})
    result = evaluate_checkpoint(path, mnist_small, record=True)
    assert {"test_accuracy", "tent_vshift_0.3", "tent_noise_0.3", "source_vshift_0.3"} <= result.keys()
    assert all(0.0 <= v <= 1.0 for v in result.values())
    _, meta = load_baseline(path)
    assert meta.metrics["test_accuracy"] == result["test_accuracy"]
    assert evaluate_accuracy(model.eval(), mnist_small.test.x, mnist_small.test.y) == result["test_accuracy"]


def test_dry_run_then_resume_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "dnn.pt"
    args = ["--model", "dnn", "--data-dir", DATA_DIR, "--train-limit", "512", "--out", str(out), "--dry-run"]
    if not Path(DATA_DIR).exists():
        pytest.skip("MNIST not available")
    main(args)
    assert out.exists()
    assert out.with_suffix(".pt.state").exists()
    main([*args, "--resume"])
    assert "resumed at epoch 1" in capsys.readouterr().out


def test_cli_dry_run_subprocess(tmp_path: Path, mnist_small: Mnist) -> None:
    """The entry point as a user runs it (the in-process test above covers the DNN path)."""
    out = tmp_path / "model.pt"
    cmd = [sys.executable, "-m", "training.train_baseline", "--model", "bncnn", "--augment", "vshift"]
    cmd += ["--dry-run", "--threads", "1", "--train-limit", "512", "--out", str(out)]
    env = {**os.environ, "CAMA_DATA_DIR": DATA_DIR}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "val acc" in proc.stdout
    _, meta = load_baseline(out)
    assert meta.kind == "bncnn"
    assert meta.provenance["train_config"]["augment"] == "vshift"
    assert meta.provenance["train_config"]["dry_run"] is True

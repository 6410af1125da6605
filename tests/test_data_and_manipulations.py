"""MNIST loading (IDX, gz, npz, checksummed download) and the manipulations."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest

from training import data as D
from training import manipulations as M


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


def small_mnist(directory: Path, gz: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (20, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, (20,)),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (7, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, (7,)),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for stem, arr in arrays.items():
        write_idx(directory / (stem + (".gz" if gz else "")), arr, gz)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_load_idx_files(tmp_path, gz):
    arrays = small_mnist(tmp_path / "mnist", gz=gz)
    mnist = D.load_mnist(tmp_path)
    assert mnist.train.x.shape == (20, 1, 28, 28)
    assert mnist.train.x.dtype == np.float32
    np.testing.assert_array_equal(mnist.train.x[:, 0] * 255, arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(mnist.test.y, arrays["t10k-labels-idx1-ubyte"])
    assert mnist.train.x.min() >= 0.0
    assert mnist.train.x.max() <= 1.0
    assert len(mnist.checksum) == 64


def test_load_npz_and_env_dir(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    np.savez(
        tmp_path / "mnist.npz",
        x_train=rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        y_train=np.arange(5, dtype=np.uint8),
        x_test=rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        y_test=np.arange(3, dtype=np.uint8),
    )
    monkeypatch.setenv(D.DATA_DIR_ENV, str(tmp_path))
    mnist = D.load_mnist()
    assert len(mnist.train) == 5
    assert len(mnist.test) == 3
    np.testing.assert_array_equal(mnist.train.y, np.arange(5))


def test_missing_and_truncated_files_raise(tmp_path):
    with pytest.raises(D.DataError, match="no MNIST"):
        D.load_mnist(tmp_path)
    small_mnist(tmp_path / "mnist", gz=False)
    path = tmp_path / "mnist" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(D.DataError, match="expected"):
        D.load_mnist(tmp_path)


def test_download_verifies_md5_offline(tmp_path):
    mirror = tmp_path / "mirror"
    small_mnist(mirror, gz=True)
    files = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in mirror.iterdir()}
    target = D.download_mnist(tmp_path / "data", mirrors=(mirror.as_uri() + "/",), files=files)
    assert sorted(p.name for p in target.iterdir()) == sorted(files)
    assert len(D.load_mnist(tmp_path / "data").train) == 20
    bad = dict(files)
    bad["t10k-labels-idx1-ubyte.gz"] = "0" * 32
    with pytest.raises(D.DataError, match="MD5 mismatch"):
        D.download_mnist(tmp_path / "other", mirrors=(mirror.as_uri() + "/",), files=bad)
    assert not list((tmp_path / "other" / "mnist").glob("*.part"))


def test_real_shared_mnist_is_the_published_data():
    """CI points CAMA_DATA_DIR at the shared copy: 60000/10000 images with the known label counts."""
    mnist = D.load_mnist()
    assert len(mnist.train) == 60000
    assert len(mnist.test) == 10000
    assert np.bincount(mnist.test.y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert mnist.test.y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def one_pixel_images(n: int) -> np.ndarray:
    x = np.zeros((n, 1, 28, 28), dtype=np.float32)
    x[:, 0, 14, 14] = 1.0
    return x


@pytest.mark.parametrize(("axis", "dim"), [("vertical", 0), ("horizontal", 1)])
def test_shift_moves_pixels_by_an_integer_offset_within_the_range(axis, dim):
    x = one_pixel_images(2000)
    out = M.shift(x, 0.3, axis, np.random.default_rng(0))
    limit = M.max_offset(0.3, 28)
    assert limit == 8
    offsets = []
    for img in out[:, 0]:
        pos = np.argwhere(img == 1.0)
        assert pos.shape == (1, 2)
        assert img.sum() == 1.0
        other = 1 - dim
        assert pos[0, other] == 14  # the other axis is untouched
        offsets.append(pos[0, dim] - 14)
    offsets_arr = np.array(offsets)
    assert offsets_arr.min() == -limit
    assert offsets_arr.max() == limit
    assert set(np.unique(offsets_arr)) == set(range(-limit, limit + 1))


def test_shift_fills_with_zeros_and_is_seeded():
    x = np.ones((50, 1, 28, 28), dtype=np.float32)
    a = M.vertical_shift(x, 0.5, np.random.default_rng(3))
    b = M.vertical_shift(x, 0.5, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    rows_zero = (a[:, 0].sum(axis=2) == 0).sum(axis=1)  # empty rows = |offset|
    assert rows_zero.max() <= 14
    assert rows_zero.max() > 0
    np.testing.assert_array_equal(M.horizontal_shift(x, 0.0, np.random.default_rng(0)), x)


def test_other_manipulations_stay_in_range_and_do_what_they_say():
    rng = np.random.default_rng(0)
    x = np.random.default_rng(1).random((10, 1, 28, 28)).astype(np.float32)
    noisy = M.gaussian_noise(x, 0.3, rng)
    assert noisy.min() >= 0
    assert noisy.max() <= 1
    assert np.abs(noisy - x).mean() > 0.1
    sp = M.salt_and_pepper(x, 0.1, rng)
    changed = (sp != x).mean()
    assert 0.05 < changed < 0.15
    assert set(np.unique(sp[sp != x])) <= {0.0, 1.0}
    np.testing.assert_allclose(M.contrast(x, 0.5, 0.25), 0.5 * x + 0.25, rtol=1e-6)
    blurred = M.gaussian_blur(x, 1.0)
    assert blurred.std() < x.std()
    rotated = M.rotation(one_pixel_images(4), 0.0, rng)
    np.testing.assert_allclose(rotated, one_pixel_images(4), atol=1e-5)
    zca = M.fit_zca(x.reshape(10, 1, 28, 28))
    white = zca(x)
    assert white.shape == x.shape
    assert white.min() >= 0
    assert white.max() <= 1
    with pytest.raises(ValueError, match="unknown manipulation"):
        M.named("teleport", 1.0)


def test_mnist_c_loads_from_the_npz_and_from_the_benchmark_layout(tmp_path):
    data = D.load_mnist_c()  # $CAMA_DATA_DIR
    assert set(data.images) == set(D.MNISTC_CORRUPTIONS)
    mnist = D.load_mnist()
    np.testing.assert_array_equal(data.y, mnist.test.y)  # the test images in MNIST's order
    for name in ("fog", "shear"):
        x = data.images[name]
        assert x.shape == (10000, 1, 28, 28)
        assert x.dtype == np.float32
        assert float(x.min()) >= 0.0
        assert float(x.max()) <= 1.0
        assert not np.array_equal(x, mnist.test.x)
    assert len(data.checksum) == 64
    # the benchmark's own layout (the distributed archive, unpacked): a slice of the same arrays
    for name in D.MNISTC_CORRUPTIONS:
        folder = tmp_path / "mnist_c" / name
        folder.mkdir(parents=True)
        np.save(
            folder / "test_images.npy", np.round(data.images[name][:5, 0, :, :, None] * 255).astype(np.uint8)
        )
        np.save(folder / "test_labels.npy", data.y[:5])
    unpacked = D.load_mnist_c(tmp_path)
    np.testing.assert_allclose(unpacked.images["fog"], data.images["fog"][:5], atol=1e-6)
    with pytest.raises(D.DataError, match="no MNIST-C"):
        D.load_mnist_c(tmp_path / "empty")


def test_generic_family_manipulates_every_image_within_range():
    x = np.zeros((64, 1, 28, 28), np.float32)
    x[:, :, 8:20, 12:16] = 1.0  # a bar, so that geometry changes the image too
    a = M.generic(x, np.random.default_rng(0))
    b = M.generic(x, np.random.default_rng(0))
    np.testing.assert_array_equal(a, b)  # seeded
    assert a.shape == x.shape
    assert a.dtype == np.float32
    assert float(a.min()) >= 0.0
    assert float(a.max()) <= 1.0
    changed = np.abs(a - x).reshape(64, -1).max(1) > 0
    assert changed.all()  # at least one family acts on every image
    assert M.named("generic", 0.0) is M.generic


CIFAR_DIR = D.resolve_data_dir()


def test_cifar_binary_loads_the_real_file_checksummed() -> None:
    if not (CIFAR_DIR / D.CIFAR_BINARY_FILE).exists():
        pytest.skip("cifar_binary.npz not available")
    data = D.load_cifar_binary(CIFAR_DIR)
    assert data.checksum == D.CIFAR_BINARY_SHA256
    assert data.train.x.shape == (10000, 3, 32, 32)
    assert data.test.x.shape == (2000, 3, 32, 32)
    assert data.train.x.dtype == np.float32
    assert data.train.x.min() >= 0.0
    assert data.train.x.max() <= 1.0
    assert np.bincount(data.train.y).tolist() == [5000, 5000]  # 0 airplane, 1 frog
    assert np.bincount(data.test.y).tolist() == [1000, 1000]
    # channels first, in R, G, B order: airplanes are bluer than frogs (data README's class means)
    means = [data.train.x[data.train.y == c].mean(axis=(0, 2, 3)) for c in (0, 1)]
    np.testing.assert_allclose(means[0], [0.5257, 0.5603, 0.5889], atol=1e-3)
    np.testing.assert_allclose(means[1], [0.4701, 0.4384, 0.3452], atol=1e-3)
    assert D.load_dataset("cifar_binary", CIFAR_DIR).checksum == data.checksum
    with pytest.raises(D.DataError, match="SHA-256"):
        D.load_cifar_binary(CIFAR_DIR, sha256="0" * 64)


def test_cifar_binary_refuses_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(D.DataError, match=r"no cifar_binary\.npz"):
        D.load_cifar_binary(tmp_path)
    path = tmp_path / D.CIFAR_BINARY_FILE
    rng = np.random.default_rng(0)
    np.savez(
        path,
        x_train=rng.integers(0, 256, (4, 32, 32), dtype=np.uint8),  # no channel axis
        y_train=np.array([0, 1, 0, 1], dtype=np.uint8),
        x_test=rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),
        y_test=np.array([0, 1], dtype=np.uint8),
    )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(D.DataError, match="expected"):
        D.load_cifar_binary(tmp_path, sha256=digest)
    with pytest.raises(ValueError, match="unknown data set"):
        D.load_dataset("imagenet", tmp_path)

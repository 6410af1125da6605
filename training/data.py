"""Image data sets: MNIST (standard IDX files, gzipped or not, or ``mnist.npz``, with checksummed
download), MNIST-C's test split, and CIFAR-binary (CIFAR-10 airplane vs frog, ``cifar_binary.npz``).

The data directory comes from ``--data-dir``, else the ``CAMA_DATA_DIR`` environment variable,
else :data:`DEFAULT_DATA_DIR` (``./data``; every command and test resolves it here). Where the
MNIST files are missing and the user has a network, ``download_mnist`` fetches them from the
standard mirrors and verifies each file's MD5.
Every loader returns images as float32 in [0, 1], ``(N, C, H, W)``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import struct
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA_DIR_ENV = "CAMA_DATA_DIR"
DEFAULT_DATA_DIR = Path("data")  # relative to the working directory

MNIST_FILES: dict[str, str] = {
    # file name -> MD5 of the .gz file as distributed (the classic LeCun values)
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)


class DataError(RuntimeError):
    """Raised when a data file is missing, truncated or fails its checksum."""


@dataclass(frozen=True)
class Split:
    """Images as float32 in [0, 1], ``(N, C, H, W)`` (MNIST ``(N, 1, 28, 28)``), and int64 labels ``(N,)``."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class ImageDataset:
    """The train and test splits of an image data set and the SHA-256 of the files they came from."""

    train: Split
    test: Split
    checksum: str


Mnist = ImageDataset  # the name the MNIST experiments use


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """``data_dir`` if given, else ``$CAMA_DATA_DIR``, else :data:`DEFAULT_DATA_DIR`."""
    return Path(data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def add_data_dir_argument(parser: argparse.ArgumentParser) -> None:
    """A command's ``--data-dir`` option (None: :func:`resolve_data_dir`'s default)."""
    parser.add_argument(
        "--data-dir",
        default=None,
        help=f"data directory (default ${DATA_DIR_ENV}, else ./{DEFAULT_DATA_DIR})",
    )


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (``.gz`` or raw) into a uint8 array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4:
        raise DataError(f"{path}: not an IDX file (too short)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path}: unsupported IDX header (magic {data[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(dims)):
        raise DataError(f"{path}: expected {int(np.prod(dims))} values, found {payload.size}")
    return payload.reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path | None:
    """``stem.gz`` or ``stem`` (also the dotted ``train-images.idx3-ubyte`` spelling)."""
    dotted = stem.replace("-idx", ".idx")
    for name in (f"{stem}.gz", stem, f"{dotted}.gz", dotted):
        candidate = directory / name
        if candidate.exists():
            return candidate
    return None


def _sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _split(images: np.ndarray, labels: np.ndarray) -> Split:
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    x = (images.astype(np.float32) / 255.0)[:, None, :, :]
    return Split(x=x, y=labels.astype(np.int64))


def load_mnist(data_dir: str | os.PathLike[str] | None = None) -> ImageDataset:
    """Load MNIST from ``<dir>/mnist/*idx*``, ``<dir>/*idx*`` or ``<dir>/mnist.npz`` (in that order)."""
    root = resolve_data_dir(data_dir)
    for directory in (root / "mnist", root):
        stems = [name.removesuffix(".gz") for name in MNIST_FILES]
        paths = [_find_idx(directory, stem) for stem in stems]
        if all(p is not None for p in paths):
            found = [p for p in paths if p is not None]
            arrays = [read_idx(p) for p in found]
            return ImageDataset(
                train=_split(arrays[0], arrays[1]),
                test=_split(arrays[2], arrays[3]),
                checksum=_sha256(found),
            )
    npz = root / "mnist.npz"
    if npz.exists():
        with np.load(npz) as d:
            return ImageDataset(
                train=_split(d["x_train"], d["y_train"]),
                test=_split(d["x_test"], d["y_test"]),
                checksum=_sha256([npz]),
            )
    raise DataError(
        f"no MNIST under {root}: expected the four IDX files or mnist.npz "
        f"(set {DATA_DIR_ENV} or --data-dir, or run `python -m training.data --download`)"
    )


def md5_of(path: Path) -> str:
    """MD5 of a file, as the MNIST mirrors publish it."""
    return hashlib.md5(path.read_bytes()).hexdigest()  # noqa: S324 - matching published checksums


def download_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    mirrors: tuple[str, ...] = MNIST_MIRRORS,
    files: dict[str, str] | None = None,
) -> Path:
    """Fetch the IDX files into ``<dir>/mnist`` from the first mirror that serves each; verify MD5."""
    target = resolve_data_dir(data_dir) / "mnist"
    target.mkdir(parents=True, exist_ok=True)
    for name, md5 in (files or MNIST_FILES).items():
        path = target / name
        if path.exists() and md5_of(path) == md5:
            continue
        errors: list[str] = []
        for mirror in mirrors:
            tmp = path.with_suffix(path.suffix + ".part")
            try:
                urllib.request.urlretrieve(mirror + name, tmp)  # noqa: S310 - fixed https mirrors
            except OSError as exc:
                errors.append(f"{mirror}: {exc}")
                continue
            if md5_of(tmp) != md5:
                tmp.unlink()
                errors.append(f"{mirror}: MD5 mismatch")
                continue
            tmp.replace(path)
            break
        else:
            raise DataError(f"could not download {name}: " + "; ".join(errors))
    return target


MNISTC_CORRUPTIONS = (
    "shot_noise",
    "impulse_noise",
    "glass_blur",
    "motion_blur",
    "shear",
    "scale",
    "rotate",
    "brightness",
    "translate",
    "stripe",
    "fog",
    "spatter",
    "dotted_line",
    "zigzag",
    "canny_edges",
)


@dataclass(frozen=True)
class MnistC:
    """MNIST-C's test corruptions (Mu & Gilmer 2019): per corruption the 10,000 MNIST test images,
    float32 in [0, 1] ``(N, 1, 28, 28)``, in MNIST's order; their labels; the files' SHA-256."""

    images: dict[str, np.ndarray]
    y: np.ndarray
    checksum: str

    def split(self, corruption: str) -> Split:
        return Split(self.images[corruption], self.y)


def load_mnist_c(data_dir: str | os.PathLike[str] | None = None) -> MnistC:
    """Load MNIST-C's test split from ``<dir>/mnist_c_test.npz`` (``y_test`` and one array per
    corruption) or from the benchmark's own layout ``<dir>/mnist_c/<corruption>/test_images.npy``
    and ``test_labels.npy`` (the distributed archive, unpacked)."""
    root = resolve_data_dir(data_dir)
    npz = root / "mnist_c_test.npz"
    if npz.exists():
        with np.load(npz) as d:
            missing = [c for c in MNISTC_CORRUPTIONS if c not in d]
            if missing:
                raise DataError(f"{npz}: no arrays for {missing}")
            images = {c: _images(d[c]) for c in MNISTC_CORRUPTIONS}
            y = d["y_test"].astype(np.int64)
        return MnistC(images, y, _sha256([npz]))
    folder = root / "mnist_c"
    if folder.is_dir():
        files = [
            folder / c / name for c in MNISTC_CORRUPTIONS for name in ("test_images.npy", "test_labels.npy")
        ]
        absent = [str(p) for p in files if not p.exists()]
        if absent:
            raise DataError(f"MNIST-C is incomplete under {folder}: missing {absent[:3]}")
        images = {c: _images(np.load(folder / c / "test_images.npy")) for c in MNISTC_CORRUPTIONS}
        y = np.load(folder / MNISTC_CORRUPTIONS[0] / "test_labels.npy").astype(np.int64)
        return MnistC(images, y, _sha256(files))
    raise DataError(
        f"no MNIST-C under {root}: expected mnist_c_test.npz or mnist_c/<corruption>/test_images.npy "
        f"(set {DATA_DIR_ENV} or --data-dir)"
    )


def _images(arr: np.ndarray) -> np.ndarray:
    """uint8 ``(N, 28, 28)`` or ``(N, 28, 28, 1)`` -> float32 in [0, 1], ``(N, 1, 28, 28)``."""
    if arr.ndim == 4:
        arr = arr[..., 0]
    if arr.ndim != 3 or arr.shape[1:] != (28, 28):
        raise DataError(f"expected 28x28 images, got shape {arr.shape}")
    return (arr.astype(np.float32) / 255.0)[:, None, :, :]


CIFAR_BINARY_FILE = "cifar_binary.npz"
CIFAR_BINARY_SHA256 = "3cadbca910e3427b2c30d43b81c4ae627e071ed2fef0de9b36e814927e27ff12"
CIFAR_BINARY_CLASSES = ("airplane", "frog")  # labels 0 and 1 (CIFAR-10 classes 0 and 6)


def load_cifar_binary(
    data_dir: str | os.PathLike[str] | None = None, *, sha256: str = CIFAR_BINARY_SHA256
) -> ImageDataset:
    """CIFAR-binary (paper section 4.1): CIFAR-10's airplane (0) and frog (1) images from
    ``<dir>/cifar_binary.npz``, 10,000 train and 2,000 test, ``(N, 3, 32, 32)`` float32 in [0, 1].

    The file's SHA-256 must equal ``sha256`` (the published file's by default).
    """
    path = resolve_data_dir(data_dir) / CIFAR_BINARY_FILE
    if not path.exists():
        raise DataError(f"no {CIFAR_BINARY_FILE} under {path.parent} (set {DATA_DIR_ENV} or --data-dir)")
    digest = _sha256([path])
    if digest != sha256:
        raise DataError(f"{path}: SHA-256 {digest}, expected {sha256}")
    with np.load(path) as d:
        train = Split(_rgb_images(d["x_train"]), d["y_train"].astype(np.int64))
        test = Split(_rgb_images(d["x_test"]), d["y_test"].astype(np.int64))
    for name, split in (("train", train), ("test", test)):
        if split.x.shape[0] != len(split) or not np.isin(split.y, (0, 1)).all():
            raise DataError(f"{path}: {name} split has mismatched images/labels or labels outside {{0, 1}}")
    return ImageDataset(train=train, test=test, checksum=digest)


def _rgb_images(arr: np.ndarray) -> np.ndarray:
    """uint8 ``(N, H, W, 3)`` -> float32 in [0, 1], ``(N, 3, H, W)``."""
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise DataError(f"expected (N, H, W, 3) images, got shape {arr.shape}")
    return np.ascontiguousarray((arr.astype(np.float32) / 255.0).transpose(0, 3, 1, 2))


DATASETS = ("mnist", "cifar_binary")


def load_dataset(name: str, data_dir: str | os.PathLike[str] | None = None) -> ImageDataset:
    """One of :data:`DATASETS` by name."""
    if name == "mnist":
        return load_mnist(data_dir)
    if name == "cifar_binary":
        return load_cifar_binary(data_dir)
    raise ValueError(f"unknown data set {name!r}; known: {DATASETS}")


VAL_FRACTION = 0.05  # of the training set, held out for model selection (the paper's protocol)


def validation_split(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Hold out ``fraction`` of the training set (seeded) for model selection."""
    order = np.random.default_rng(seed).permutation(len(train))
    n_val = round(fraction * len(train))
    val_idx, tr_idx = order[:n_val], order[n_val:]
    return Split(train.x[tr_idx], train.y[tr_idx]), Split(train.x[val_idx], train.y[val_idx])


def batches(
    split: Split, batch_size: int, rng: np.random.Generator
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Shuffled mini-batches of a split."""
    order = rng.permutation(len(split))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield split.x[idx], split.y[idx]


def main(argv: list[str] | None = None) -> None:
    """``python -m training.data --download [--data-dir DIR]``: fetch and verify MNIST."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    add_data_dir_argument(parser)
    parser.add_argument("--download", action="store_true")
    args = parser.parse_args(argv)
    if args.download:
        print(download_mnist(args.data_dir))
    mnist = load_mnist(args.data_dir)
    print(f"train {len(mnist.train)}  test {len(mnist.test)}  sha256 {mnist.checksum[:16]}")


if __name__ == "__main__":
    main()

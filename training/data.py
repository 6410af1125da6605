"""Image data sets: MNIST (standard IDX files, gzipped or not, or ``mnist.npz``, with checksummed
download), MNIST-C's test split, CIFAR-binary (CIFAR-10 airplane vs frog, ``cifar_binary.npz``),
and a user's own images (``images``: a folder with one subfolder of PNG/JPEG files per class, or
an ``.npz`` with ``x``, ``y`` and optional ``class_names``), resized to the size a config names.

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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

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
    classes: tuple[str, ...] | None = None  # class names, label order (a user's own images)


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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_MODES = {1: "L", 3: "RGB"}  # channels -> the PIL mode every image is converted to
TEST_FRACTION = 0.2  # of a user's images, held out as the test split when none is given


@dataclass(frozen=True)
class ImageSpec:
    """How a user's images are read: ``(C, H, W)`` after conversion to grey (1) or RGB (3) and a
    bilinear resize, and the seeded fraction held out as the test split (when the source has
    none: a folder without ``train/`` and ``test/``, an ``.npz`` without ``x_test``)."""

    image_size: tuple[int, int] = (28, 28)
    channels: int = 1
    test_fraction: float = TEST_FRACTION
    seed: int = 0

    def __post_init__(self) -> None:
        if self.channels not in IMAGE_MODES:
            raise DataError(f"channels must be 1 (grey) or 3 (RGB), got {self.channels}")
        if min(self.image_size) < 1 or not 0.0 <= self.test_fraction < 1.0:
            raise DataError(f"bad image size {self.image_size} or test fraction {self.test_fraction}")


def _to_image(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    """A PIL image -> float32 in [0, 1], ``(C, H, W)`` of ``spec``."""
    height, width = spec.image_size
    img = img.convert(IMAGE_MODES[spec.channels])
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(img, dtype=np.float32).reshape(height, width, spec.channels) / 255.0
    return pixels.transpose(2, 0, 1)


def read_image_folder(
    root: Path, spec: ImageSpec, classes: tuple[str, ...] | None
) -> tuple[Split, list[Path]]:
    """The PNG/JPEG files under ``root/<class>/``; labels index ``classes`` (default: the sorted
    subfolder names)."""
    names = classes or tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    xs, ys, files = [], [], []
    for label, name in enumerate(names):
        folder = root / name
        paths = (
            sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if folder.is_dir()
            else []
        )
        for path in paths:
            try:
                with Image.open(path) as img:
                    xs.append(_to_image(img, spec))
            except (OSError, ValueError) as exc:
                raise DataError(f"{path}: cannot read the image: {exc}") from exc
            ys.append(label)
            files.append(path)
    unknown = sorted({p.name for p in root.iterdir() if p.is_dir()} - set(names))
    if unknown:
        raise DataError(f"{root}: classes {unknown} are not among the training classes {list(names)}")
    if not xs:
        raise DataError(f"{root}: no PNG or JPEG files in class subfolders")
    return Split(np.stack(xs), np.asarray(ys, np.int64)), files


def _array_split(x: np.ndarray, y: np.ndarray, spec: ImageSpec) -> Split:
    """``x (N, H, W)`` or ``(N, H, W, C)``, uint8 or float in [0, 1], through the same conversion
    as files."""
    if x.ndim not in (3, 4) or x.shape[0] != y.shape[0]:
        raise DataError(f"expected x (N, H, W[, C]) and y (N,), got {x.shape} and {y.shape}")
    levels = x if x.dtype == np.uint8 else np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
    images = [
        _to_image(Image.fromarray(np.squeeze(a, -1) if a.ndim == 3 and a.shape[-1] == 1 else a), spec)
        for a in levels
    ]
    return Split(np.stack(images), y.astype(np.int64))


def _hold_out(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """(rest, held out): a seeded ``fraction`` of ``split``."""
    order = np.random.default_rng(seed).permutation(len(split))
    n = round(fraction * len(split))
    keep, held = order[n:], order[:n]
    return Split(split.x[keep], split.y[keep]), Split(split.x[held], split.y[held])


def load_images(path: str | os.PathLike[str], spec: ImageSpec) -> ImageDataset:
    """A user's own images: a folder ``DIR/<class>/*.png|jpg`` (class names = the sorted folder
    names; with ``DIR/train/`` and ``DIR/test/`` those are the splits) or an ``.npz`` with ``x``,
    ``y`` and optional ``class_names``, ``x_test`` and ``y_test``. Without a test split
    ``spec.test_fraction`` of the images is held out (seeded)."""
    source = Path(path)
    if source.suffix == ".npz" and source.is_file():
        with np.load(source) as d:
            if "x" not in d or "y" not in d:
                raise DataError(f"{source}: expected arrays x and y")
            train = _array_split(d["x"], d["y"], spec)
            test = _array_split(d["x_test"], d["y_test"], spec) if "x_test" in d else None
            n_classes = int(max(train.y.max(), -1 if test is None else test.y.max())) + 1
            names = tuple(str(c) for c in d["class_names"]) if "class_names" in d else None
        classes = names or tuple(str(c) for c in range(n_classes))
        checksum = _sha256([source])
    elif source.is_dir():
        if (source / "train").is_dir() and (source / "test").is_dir():
            train, files = read_image_folder(source / "train", spec, None)
            classes = tuple(sorted(p.name for p in (source / "train").iterdir() if p.is_dir()))
            test, test_files = read_image_folder(source / "test", spec, classes)
            files += test_files
        else:
            train, files = read_image_folder(source, spec, None)
            classes = tuple(sorted(p.name for p in source.iterdir() if p.is_dir()))
            test = None
        checksum = _sha256(files)
    else:
        raise DataError(f"{source}: neither an image folder nor an .npz file")
    if len(classes) < 2 or int(train.y.max()) >= len(classes):
        raise DataError(f"{source}: need at least 2 classes and a name for each label, got {list(classes)}")
    if test is None:
        train, test = _hold_out(train, spec.test_fraction, spec.seed)
    return ImageDataset(train=train, test=test, checksum=checksum, classes=classes)


DATASETS = ("mnist", "cifar_binary", "images")
NAMED_SHAPES: dict[str, tuple[ImageSpec, tuple[str, ...]]] = {  # how images are read for a named data set
    "mnist": (ImageSpec((28, 28), 1), tuple(str(d) for d in range(10))),
    "cifar_binary": (ImageSpec((32, 32), 3), CIFAR_BINARY_CLASSES),
}


def load_dataset(
    name: str, data_dir: str | os.PathLike[str] | None = None, *, spec: ImageSpec | None = None
) -> ImageDataset:
    """One of :data:`DATASETS` by name; for ``images``, ``data_dir`` is the folder or ``.npz`` and
    ``spec`` says how to read it."""
    if name == "mnist":
        return load_mnist(data_dir)
    if name == "cifar_binary":
        return load_cifar_binary(data_dir)
    if name == "images":
        if data_dir is None:
            raise DataError("the images data set needs a folder or .npz (--data)")
        return load_images(data_dir, spec or ImageSpec())
    raise ValueError(f"unknown data set {name!r}; known: {DATASETS}")


VAL_FRACTION = 0.05  # of the training set, held out for model selection (the paper's protocol)


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """The options that name a run's data: ``--dataset``, ``--data-dir``, and a user's own images
    (``--data``, ``--image-size``, ``--channels``, ``--test-fraction``)."""
    parser.add_argument("--dataset", choices=DATASETS, default="mnist", help="images: your own (--data)")
    add_data_dir_argument(parser)
    parser.add_argument(
        "--data",
        default=None,
        help="your own images: a folder with one subfolder of PNG/JPEG files per class, or an .npz "
        "with x, y and optional class_names (implies --dataset images)",
    )
    parser.add_argument("--image-size", type=int, nargs="+", default=[28], help="H [W] of --data's images")
    parser.add_argument("--channels", type=int, choices=sorted(IMAGE_MODES), default=1, help="1 grey, 3 RGB")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=VAL_FRACTION,
        help="of the training set, held out for validation",
    )
    parser.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--test-limit", type=int, default=None, help="score only the first N test images")
    parser.add_argument(
        "--test-fraction",
        type=float,
        default=TEST_FRACTION,
        help="held out as --data's test split if it has none",
    )


def data_from_args(args: argparse.Namespace) -> tuple[ImageDataset, dict[str, object]]:
    """The data set :func:`add_data_args`'s options name (the first ``--train-limit`` training and
    ``--test-limit`` test images) and what a checkpoint records of it: the data set, and for a
    user's images the source and :class:`ImageSpec` (which ``export`` reads back to build the
    serving data) and the class names (which ``/predict`` returns)."""
    data, record = _named_or_own(args)
    train, test = data.train, data.test
    return replace(
        data,
        train=Split(train.x[: args.train_limit], train.y[: args.train_limit]),
        test=Split(test.x[: args.test_limit], test.y[: args.test_limit]),
    ), record


def _named_or_own(args: argparse.Namespace) -> tuple[ImageDataset, dict[str, object]]:
    if args.data is None:
        data = load_dataset(args.dataset, args.data_dir)
        return data, {"dataset": args.dataset, "data_sha256": data.checksum}
    size = tuple(args.image_size) * 2 if len(args.image_size) == 1 else tuple(args.image_size[:2])
    spec = ImageSpec(
        image_size=(int(size[0]), int(size[1])),
        channels=args.channels,
        test_fraction=args.test_fraction,
        seed=args.seed,
    )
    data = load_images(args.data, spec)
    record: dict[str, object] = {
        "dataset": "images",
        "data_sha256": data.checksum,
        "data_source": {"path": str(args.data), **asdict(spec), "image_size": list(spec.image_size)},
        "class_names": list(data.classes or ()),
    }
    return data, record


def images_from_record(record: dict[str, Any]) -> ImageDataset:
    """The user's images a checkpoint's ``data_source`` names, read as they were for training."""
    source = dict(record)
    path = source.pop("path")
    source["image_size"] = tuple(source["image_size"])
    return load_images(path, ImageSpec(**source))


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


def recorded_test_split(
    provenance: dict[str, Any], data: str | None = None, data_dir: str | os.PathLike[str] | None = None
) -> Split:
    """The images to score a checkpoint on: the test split of the data set its provenance records
    (a named one under ``data_dir``, or the user's images it was trained on), or every image of
    ``data`` (a folder of class subfolders named as the model's classes, or an ``.npz`` with ``x``
    and ``y``), read as the model's training images were."""
    dataset = str(provenance.get("dataset", "mnist"))
    source = provenance.get("data_source")
    if data is None:
        if isinstance(source, dict):
            return images_from_record(source).test
        return load_dataset(dataset, data_dir).test
    if isinstance(source, dict):
        height, width = source["image_size"]
        spec = ImageSpec((int(height), int(width)), int(source["channels"]))
        classes = tuple(str(c) for c in provenance.get("class_names", ()))
    elif dataset in NAMED_SHAPES:
        spec, classes = NAMED_SHAPES[dataset]
    else:
        raise DataError(f"the checkpoint's data set {dataset!r} is not one of images")
    path = Path(data)
    if path.suffix == ".npz":
        with np.load(path) as d:
            return _array_split(d["x"], d["y"], spec)
    return read_image_folder(path, spec, classes)[0]


def main(argv: list[str] | None = None) -> None:
    """``python -m training.data --download [--data-dir DIR]``: fetch and verify MNIST."""
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

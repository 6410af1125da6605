"""Turn request payloads (base64 PNG/JPEG, nested arrays, uploaded files, measurement records) into arrays.

Images take the shape ``(C, H, W)`` of the model they are sent to (its manifest's ``inputs``):
one channel (grey) or three (RGB).

Each function raises :class:`store.errors.InvalidInputError` with a precise reason: ``bad_shape``,
``undecodable_image``, ``non_finite``, ``out_of_range``, ``wrong_input_kind``, ``no_inputs``.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from app.schemas import MeasurementRecord
from store.data import Inputs
from store.errors import InvalidInputError, LimitExceededError

MNIST_SHAPE: tuple[int, int, int] = (1, 28, 28)
MODES = {1: "L", 3: "RGB"}


def decode_image_bytes(
    data: bytes, index: int, max_bytes: int, shape: tuple[int, int, int] = MNIST_SHAPE
) -> np.ndarray:
    """A PNG/JPEG file -> levels in [0, 1], ``shape`` = ``(C, H, W)`` float32.

    One channel: the grey levels of any PNG/JPEG mode; three: its RGB values (a grey file is
    repeated over the channels). Only the header is read before the size is checked, so an image
    of any other size (a decompression bomb included: PIL refuses more than
    ``Image.MAX_IMAGE_PIXELS``) is refused without decoding its pixels.
    """
    channels, height, width = shape
    if len(data) > max_bytes:
        raise LimitExceededError(
            f"image {index}: {len(data)} bytes (limit {max_bytes})", reason="image_too_large"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in ("PNG", "JPEG"):
                raise InvalidInputError(
                    f"image {index}: format {img.format} (expected PNG or JPEG)", reason="undecodable_image"
                )
            if img.size != (width, height):
                raise InvalidInputError(
                    f"image {index}: size {img.size[0]}x{img.size[1]}, expected {width}x{height}",
                    reason="bad_shape",
                )
            pixels = np.asarray(img.convert(MODES[channels]), dtype=np.float32) / 255.0
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise LimitExceededError(f"image {index}: too many pixels: {exc}", reason="image_too_large") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, MemoryError) as exc:
        raise InvalidInputError(f"image {index}: cannot decode: {exc}", reason="undecodable_image") from exc
    return pixels.reshape(height, width, channels).transpose(2, 0, 1)


def decode_base64_image(
    text: str, index: int, max_bytes: int, shape: tuple[int, int, int] = MNIST_SHAPE
) -> np.ndarray:
    """A base64 string (optionally a ``data:image/...;base64,`` URL) -> ``shape`` float32."""
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    if len(text) > 2 * max_bytes:
        raise LimitExceededError(f"image {index}: base64 string too long", reason="image_too_large")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInputError(f"image {index}: invalid base64: {exc}", reason="undecodable_image") from exc
    return decode_image_bytes(data, index, max_bytes, shape)


def _nested_shape(value: object) -> tuple[int, ...] | None:
    """The shape of a regular nested list of numbers; None when ragged or not numbers."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return ()
    if not isinstance(value, (list, tuple)) or not value:
        return None
    inner = {_nested_shape(v) for v in value}
    if len(inner) != 1 or None in inner:
        return None
    (sub,) = inner
    assert sub is not None
    return (len(value), *sub)


def array_image(rows: Sequence[object], index: int, shape: tuple[int, int, int] = MNIST_SHAPE) -> np.ndarray:
    """A nested list of numbers in [0, 1] -> ``shape`` = ``(C, H, W)`` float32.

    Channels first (``C x H x W``); a one-channel model also takes ``H x W``.
    """
    got = _nested_shape(list(rows))
    accepted = {shape} | ({shape[1:]} if shape[0] == 1 else set())
    if got not in accepted:
        text = "x".join(map(str, got)) if got else "ragged"
        wanted = " or ".join("x".join(map(str, s)) for s in sorted(accepted, key=len))
        raise InvalidInputError(
            f"image {index}: array of shape {text}, expected {wanted}", reason="bad_shape"
        )
    return np.asarray(rows, dtype=np.float32).reshape(shape)


def check_values(arr: np.ndarray, what: str, *, unit_range: bool) -> None:
    """Refuse NaN/inf, and for images values outside [0, 1]."""
    if not np.isfinite(arr).all():
        raise InvalidInputError(f"{what}: contains NaN or infinity", reason="non_finite")
    if unit_range and arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise InvalidInputError(f"{what}: values must lie in [0, 1]", reason="out_of_range")


def image_shape(shapes: dict[str, list[int]]) -> tuple[int, int, int]:
    """The ``(C, H, W)`` an image model takes, from its manifest's input shapes."""
    shape = tuple(shapes.get("x", MNIST_SHAPE))
    if len(shape) != 3 or shape[0] not in MODES:
        raise InvalidInputError(f"this model takes inputs of shape {list(shape)}", reason="wrong_input_kind")
    return shape


def images_to_inputs(
    items: Sequence[str | Sequence[object]], max_image_bytes: int, shape: tuple[int, int, int] = MNIST_SHAPE
) -> Inputs:
    """JSON image items (base64 strings or nested arrays) -> ``Inputs`` of shape ``(N, C, H, W)``."""
    if not items:
        raise InvalidInputError("no images given", reason="no_inputs")
    out = np.empty((len(items), *shape), dtype=np.float32)
    for i, item in enumerate(items):
        out[i] = (
            decode_base64_image(item, i, max_image_bytes, shape)
            if isinstance(item, str)
            else array_image(item, i, shape)
        )
    check_values(out, "images", unit_range=True)
    return Inputs(out)


def files_to_inputs(
    files: Sequence[bytes], max_image_bytes: int, shape: tuple[int, int, int] = MNIST_SHAPE
) -> Inputs:
    """Uploaded PNG/JPEG files -> ``Inputs`` of shape ``(N, C, H, W)``."""
    if not files:
        raise InvalidInputError("no image files uploaded", reason="no_inputs")
    out = np.empty((len(files), *shape), dtype=np.float32)
    for i, data in enumerate(files):
        out[i] = decode_image_bytes(data, i, max_image_bytes, shape)
    return Inputs(out)


def records_to_inputs(records: Sequence[MeasurementRecord]) -> Inputs:
    """Measurement records ``{a, c, x}`` -> ``Inputs(x, (a, c))`` (shapes checked by :func:`check_shapes`)."""
    if not records:
        raise InvalidInputError("no records given", reason="no_inputs")
    parts: dict[str, np.ndarray] = {}
    for name in ("x", "a", "c"):
        lengths = {len(getattr(r, name)) for r in records}
        if len(lengths) != 1:
            raise InvalidInputError(
                f"records: field {name!r} has differing lengths {sorted(lengths)}", reason="bad_shape"
            )
        parts[name] = np.asarray([getattr(r, name) for r in records], dtype=np.float32).reshape(
            len(records), -1
        )
        check_values(parts[name], f"records.{name}", unit_range=False)
    return Inputs(parts["x"], (parts["a"], parts["c"]))

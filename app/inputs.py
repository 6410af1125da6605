"""Turn request payloads (base64 PNG/JPEG, 28x28 arrays, uploaded files, measurement records) into arrays.

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

IMAGE_SIZE = 28


def decode_image_bytes(data: bytes, index: int, max_bytes: int) -> np.ndarray:
    """A PNG/JPEG file -> grey levels in [0, 1], ``(28, 28)`` float32.

    Only the header is read before the size is checked, so an image of any other size (a
    decompression bomb included: PIL refuses more than ``Image.MAX_IMAGE_PIXELS``) is refused
    without decoding its pixels.
    """
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
            if img.size != (IMAGE_SIZE, IMAGE_SIZE):
                raise InvalidInputError(
                    f"image {index}: size {img.size[0]}x{img.size[1]}, expected 28x28", reason="bad_shape"
                )
            grey = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise LimitExceededError(f"image {index}: too many pixels: {exc}", reason="image_too_large") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, MemoryError) as exc:
        raise InvalidInputError(f"image {index}: cannot decode: {exc}", reason="undecodable_image") from exc
    return grey


def decode_base64_image(text: str, index: int, max_bytes: int) -> np.ndarray:
    """A base64 string (optionally a ``data:image/...;base64,`` URL) -> ``(28, 28)`` float32."""
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    if len(text) > 2 * max_bytes:
        raise LimitExceededError(f"image {index}: base64 string too long", reason="image_too_large")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInputError(f"image {index}: invalid base64: {exc}", reason="undecodable_image") from exc
    return decode_image_bytes(data, index, max_bytes)


def array_image(rows: Sequence[Sequence[float]], index: int) -> np.ndarray:
    """A nested 28x28 list of numbers in [0, 1] -> ``(28, 28)`` float32."""
    if len(rows) != IMAGE_SIZE or any(len(r) != IMAGE_SIZE for r in rows):
        shape = f"{len(rows)}x{'/'.join(sorted({str(len(r)) for r in rows})) or 0}"
        raise InvalidInputError(f"image {index}: array of shape {shape}, expected 28x28", reason="bad_shape")
    return np.asarray(rows, dtype=np.float32)


def check_values(arr: np.ndarray, what: str, *, unit_range: bool) -> None:
    """Refuse NaN/inf, and for images values outside [0, 1]."""
    if not np.isfinite(arr).all():
        raise InvalidInputError(f"{what}: contains NaN or infinity", reason="non_finite")
    if unit_range and arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise InvalidInputError(f"{what}: values must lie in [0, 1]", reason="out_of_range")


def images_to_inputs(items: Sequence[str | Sequence[Sequence[float]]], max_image_bytes: int) -> Inputs:
    """JSON image items (base64 strings or 28x28 arrays) -> ``Inputs`` of shape ``(N, 1, 28, 28)``."""
    if not items:
        raise InvalidInputError("no images given", reason="no_inputs")
    out = np.empty((len(items), 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for i, item in enumerate(items):
        out[i, 0] = (
            decode_base64_image(item, i, max_image_bytes) if isinstance(item, str) else array_image(item, i)
        )
    check_values(out, "images", unit_range=True)
    return Inputs(out)


def files_to_inputs(files: Sequence[bytes], max_image_bytes: int) -> Inputs:
    """Uploaded PNG/JPEG files -> ``Inputs`` of shape ``(N, 1, 28, 28)``."""
    if not files:
        raise InvalidInputError("no image files uploaded", reason="no_inputs")
    out = np.empty((len(files), 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for i, data in enumerate(files):
        out[i, 0] = decode_image_bytes(data, i, max_image_bytes)
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

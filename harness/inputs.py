"""Inputs for the service's tests and benchmarks: synthetic labelled images, PNGs, hostile PNGs."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
from PIL import Image


def digit_like_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic uint8 ``(n, 28, 28)`` images (a bar whose position encodes the label) and labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n)
    images = np.zeros((n, 28, 28), np.uint8)
    for i, label in enumerate(labels):
        row = 4 + 2 * int(label)
        images[i, row : row + 3, 6:22] = 255
    noise = rng.integers(0, 40, size=images.shape, dtype=np.uint8)
    return np.maximum(images, noise), labels.astype(np.int64)


def rgb_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic uint8 ``(n, 3, 32, 32)`` images of two classes (a red or a green square) and labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    images = rng.integers(0, 60, size=(n, 3, 32, 32), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i, int(label), 8:24, 8:24] = 230
    return images, labels.astype(np.int64)


def png_base64(image: np.ndarray) -> str:
    """A ``(28, 28)`` array in [0, 1] as a base64 PNG."""
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.round(image * 255), 0, 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def bomb_png(side: int = 20000) -> bytes:
    """A 1-bit ``side`` x ``side`` PNG of zeros: tens of kilobytes that decode to 400 megapixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + side // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")

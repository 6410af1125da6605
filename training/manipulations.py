"""Manipulations do(m) of images, as pure seeded functions on ``(N, 1, H, W)`` float arrays in [0, 1].

Shifts follow the paper (section 4.1): each image moves by a uniform random integer offset in
``[-r*H, r*H]`` along one axis, with zero fill. The others probe manipulations the model has
never been told about: noise, photometric change, blur, rotation, outliers, ZCA whitening (app. B).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

Manipulation = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def max_offset(shift_range: float, size: int) -> int:
    """The largest offset in pixels for a shift range ``r``: ``floor(r * size)``."""
    return math.floor(shift_range * size + 1e-9)


def shift(x: np.ndarray, shift_range: float, axis: str, rng: np.random.Generator) -> np.ndarray:
    """Move each image by a uniform integer offset in [-r*size, r*size] along ``axis``, zero fill.

    ``axis="vertical"`` moves rows (a positive offset moves the digit down);
    ``axis="horizontal"`` moves columns (a positive offset moves it right).
    """
    if axis not in ("vertical", "horizontal"):
        raise ValueError(f"axis must be 'vertical' or 'horizontal', not {axis!r}")
    dim = 2 if axis == "vertical" else 3
    size = x.shape[dim]
    limit = max_offset(shift_range, size)
    offsets: np.ndarray = np.asarray(rng.integers(-limit, limit + 1, size=x.shape[0]))
    out = np.zeros_like(x)
    offset_list: list[int] = [int(o) for o in offsets]
    for i, off in enumerate(offset_list):
        src = [slice(None)] * 3
        dst = [slice(None)] * 3
        if off >= 0:
            src[dim - 1], dst[dim - 1] = slice(0, size - off), slice(off, size)
        else:
            src[dim - 1], dst[dim - 1] = slice(-off, size), slice(0, size + off)
        out[i][tuple(dst)] = x[i][tuple(src)]
    return out


def vertical_shift(x: np.ndarray, shift_range: float, rng: np.random.Generator) -> np.ndarray:
    """Vertical shift with range ``shift_range`` (fig. 7, bottom row)."""
    return shift(x, shift_range, "vertical", rng)


def horizontal_shift(x: np.ndarray, shift_range: float, rng: np.random.Generator) -> np.ndarray:
    """Horizontal shift with range ``shift_range`` (fig. 7, top row)."""
    return shift(x, shift_range, "horizontal", rng)


def random_mirror(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirror each image left-right with probability 1/2 (training data of natural images)."""
    mirror = rng.random(len(x)) < 0.5
    flipped: np.ndarray = np.where(mirror[:, None, None, None], x[..., ::-1], x)
    return flipped


def gaussian_noise(x: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Add N(0, std^2) to every pixel and clip to [0, 1]."""
    noisy: np.ndarray = np.clip(x + rng.normal(0.0, std, size=x.shape).astype(x.dtype), 0.0, 1.0)
    return noisy


def salt_and_pepper(x: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Set a ``fraction`` of pixels to 0 or 1 at random (outliers)."""
    mask = rng.random(x.shape) < fraction
    values = (rng.random(x.shape) < 0.5).astype(x.dtype)
    return np.where(mask, values, x)


def contrast(x: np.ndarray, gain: float, offset: float) -> np.ndarray:
    """Photometric change ``gain * x + offset``, clipped to [0, 1] (deterministic)."""
    return np.clip(gain * x + offset, 0.0, 1.0).astype(x.dtype)


def _affine_resample(x: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x))
    theta = torch.from_numpy(matrices.astype(np.float32))
    grid = F.affine_grid(theta, list(t.shape), align_corners=False)
    return F.grid_sample(t, grid, padding_mode="zeros", align_corners=False).numpy()


def rotation(x: np.ndarray, max_degrees: float, rng: np.random.Generator) -> np.ndarray:
    """Rotate each image by a uniform random angle in [-max_degrees, max_degrees]."""
    angles = np.deg2rad(rng.uniform(-max_degrees, max_degrees, size=x.shape[0]))
    cos, sin, zero = np.cos(angles), np.sin(angles), np.zeros_like(angles)
    matrices = np.stack([cos, -sin, zero, sin, cos, zero], axis=1).reshape(-1, 2, 3)
    return _affine_resample(x, matrices)


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Blur every image with an isotropic Gaussian of width ``sigma`` pixels (deterministic)."""
    radius = max(1, math.ceil(3 * sigma))
    r = np.arange(-radius, radius + 1, dtype=np.float32)
    k1 = np.exp(-(r**2) / (2 * sigma**2))
    k1 /= k1.sum()
    kernel = torch.from_numpy(np.outer(k1, k1)[None, None].astype(np.float32))
    out = F.conv2d(torch.from_numpy(np.ascontiguousarray(x)), kernel, padding=radius)
    return out.numpy()


def fit_zca(x: np.ndarray, eps: float = 1e-2) -> Callable[[np.ndarray], np.ndarray]:
    """Fit ZCA whitening on ``x`` (appendix B); the returned function rescales each image to [0, 1]."""
    flat = x.reshape(x.shape[0], -1).astype(np.float64)
    mean = flat.mean(0)
    cov = np.cov(flat - mean, rowvar=False)
    u, s, _ = np.linalg.svd(cov)
    w = (u @ np.diag(1.0 / np.sqrt(s + eps)) @ u.T).astype(np.float32)

    def apply(images: np.ndarray) -> np.ndarray:
        white = (images.reshape(images.shape[0], -1) - mean.astype(np.float32)) @ w
        lo = white.min(1, keepdims=True)
        hi = white.max(1, keepdims=True)
        out: np.ndarray = ((white - lo) / np.maximum(hi - lo, 1e-8)).reshape(images.shape)
        return out.astype(np.float32)

    return apply


def blobs(x: np.ndarray, coverage: float, rng: np.random.Generator) -> np.ndarray:
    """Occluders of random shape: where a smooth random map (:func:`_smooth_fields`, a 5x5 grid)
    lies above its own ``1 - coverage`` quantile, the image is one random grey level (per image)."""
    n, size = x.shape[0], x.shape[-1]
    fields = _smooth_fields(n, size, 5, rng)
    cut = np.quantile(fields.reshape(n, -1), 1.0 - coverage, axis=1).reshape(n, 1, 1, 1)
    grey = rng.random((n, 1, 1, 1)).astype(x.dtype)
    out: np.ndarray = np.where(fields > cut, grey, x).astype(x.dtype)
    return out


def veil(x: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth random veil of fixed ``strength``: ``x + strength F (1 - x)``, F a smooth map in
    [0, 1] on a 4x4 grid, one per image."""
    fields = _smooth_fields(x.shape[0], x.shape[-1], 4, rng)
    out: np.ndarray = np.clip(x + strength * fields * (1.0 - x), 0.0, 1.0).astype(x.dtype)
    return out


def elastic(x: np.ndarray, pixels: float, rng: np.random.Generator) -> np.ndarray:
    """Elastic deformation: each pixel is read from a place displaced by a smooth random field
    (4x4 grid, per image and axis) of up to ``pixels`` pixels, zero fill."""
    n, size = x.shape[0], x.shape[-1]
    t = torch.from_numpy(np.ascontiguousarray(x))
    identity = torch.eye(2, 3).expand(n, 2, 3)
    grid = F.affine_grid(identity, list(t.shape), align_corners=False)
    shifts = [(_smooth_fields(n, size, 4, rng)[:, 0] * 2.0 - 1.0) * (2.0 * pixels / size) for _ in range(2)]
    grid = grid + torch.from_numpy(np.stack(shifts, axis=-1).astype(np.float32))
    out: np.ndarray = F.grid_sample(t, grid, padding_mode="zeros", align_corners=False).numpy()
    return out


def invert(x: np.ndarray, level: float) -> np.ndarray:
    """Partial negative ``(1 - level) x + level (1 - x)``: ``level = 1`` swaps ink and paper."""
    out: np.ndarray = ((1.0 - level) * x + level * (1.0 - x)).astype(x.dtype)
    return out


def named(name: str, level: float) -> Manipulation:
    """A manipulation by name and level: the vocabulary of the evaluation CLIs and the service."""
    table: dict[str, Manipulation] = {
        "vshift": lambda x, rng: vertical_shift(x, level, rng),
        "hshift": lambda x, rng: horizontal_shift(x, level, rng),
        "noise": lambda x, rng: gaussian_noise(x, level, rng),
        "saltpepper": lambda x, rng: salt_and_pepper(x, level, rng),
        "contrast": lambda x, rng: contrast(x, level, (1.0 - level) / 2.0),
        "rotation": lambda x, rng: rotation(x, level, rng),
        "blur": lambda x, rng: gaussian_blur(x, level),
        "blobs": lambda x, rng: blobs(x, level, rng),
        "veil": lambda x, rng: veil(x, level, rng),
        "elastic": lambda x, rng: elastic(x, level, rng),
        "invert": lambda x, rng: invert(x, level),
        "generic": generic,  # the family of eq. 5 copies; no level
    }
    if name not in table:
        raise ValueError(f"unknown manipulation {name!r}; known: {sorted(table)}")
    return table[name]


# --- the generic family of eq. 5's manipulated copies ----------------------------------------


def _smooth_fields(n: int, size: int, grid: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random smooth maps in [0, 1], ``(n, 1, size, size)``: uniform noise on a coarse grid,
    bilinearly upsampled."""
    coarse = torch.from_numpy(rng.random((n, 1, grid, grid)).astype(np.float32))
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False).numpy()


def random_affine(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotation up to 30 degrees, scale 0.75-1.25, shear up to 0.3, shift up to a quarter of the
    image, each image its own draw, zero fill."""
    n = x.shape[0]
    angle = np.deg2rad(rng.uniform(-30.0, 30.0, n))
    scale = rng.uniform(0.75, 1.25, n)
    shear = rng.uniform(-0.3, 0.3, n)
    tx, ty = rng.uniform(-0.5, 0.5, n), rng.uniform(-0.5, 0.5, n)  # normalised coordinates
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    matrices = np.stack([cos, -sin + shear * cos, tx, sin, cos + shear * sin, ty], axis=1)
    out: np.ndarray = _affine_resample(x, matrices.reshape(-1, 2, 3))
    return out


def random_photometric(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``offset + gain * x`` with offset in [0, 0.5] and gain in [0.3, 1 - offset]: brightness and
    contrast, each image its own draw."""
    n = x.shape[0]
    offset = rng.uniform(0.0, 0.5, (n, 1, 1, 1)).astype(x.dtype)
    gain = (0.3 + rng.random((n, 1, 1, 1)) * (0.7 - offset)).astype(x.dtype)
    out: np.ndarray = np.clip(offset + gain * x, 0.0, 1.0).astype(x.dtype)
    return out


def random_illumination(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A smooth random veil ``x + a F (1 - x)`` (F a smooth map in [0, 1], a in [0.2, 0.9])."""
    n = x.shape[0]
    grid = int(rng.integers(2, 6))
    strength = rng.uniform(0.2, 0.9, (n, 1, 1, 1)).astype(x.dtype)
    veil = _smooth_fields(n, x.shape[-1], grid, rng) * strength
    out: np.ndarray = np.clip(x + veil * (1.0 - x), 0.0, 1.0).astype(x.dtype)
    return out


def random_noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise (std 0.05-0.4) or salt and pepper (2-20% of the pixels), per image."""
    n = x.shape[0]
    std = rng.uniform(0.05, 0.4, (n, 1, 1, 1))
    gauss = np.clip(x + rng.normal(0.0, 1.0, x.shape) * std, 0.0, 1.0)
    fraction = rng.uniform(0.02, 0.2, (n, 1, 1, 1))
    mask = rng.random(x.shape) < fraction
    salt = np.where(mask, (rng.random(x.shape) < 0.5).astype(x.dtype), x)
    use_gauss = rng.random((n, 1, 1, 1)) < 0.5
    return np.where(use_gauss, gauss, salt).astype(x.dtype)


def random_blur(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An isotropic Gaussian blur of width 0.5-1.5 pixels (one width per batch)."""
    out: np.ndarray = gaussian_blur(x, float(rng.uniform(0.5, 1.5))).astype(x.dtype)
    return out


def random_occlusion(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One to three rectangles of 1-10 by 1-10 pixels set to a random grey level (cutout)."""
    out = x.copy()
    n, size = x.shape[0], x.shape[-1]
    for i in range(n):
        for _ in range(int(rng.integers(1, 4))):
            h, w = rng.integers(1, 11, 2)
            top, left = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
            out[i, :, top : top + h, left : left + w] = rng.random()
    return out


GENERIC_FAMILY: tuple[tuple[str, Manipulation, float], ...] = (
    ("affine", random_affine, 0.5),
    ("blur", random_blur, 0.2),
    ("photometric", random_photometric, 0.25),
    ("illumination", random_illumination, 0.25),
    ("occlusion", random_occlusion, 0.2),
    ("noise", random_noise, 0.3),
)


def generic(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Eq. 5's manipulated copies: each image gets each family of ``GENERIC_FAMILY`` with its
    probability, in that order, and at least one of them.

    Generic families of image augmentation (geometry, blur, photometric change, a smooth veil,
    cutout, noise) with wide ranges; none is modelled on a benchmark's corruptions.
    """
    n = x.shape[0]
    chosen = np.stack([rng.random(n) < p for _, _, p in GENERIC_FAMILY], axis=1)
    none = ~chosen.any(axis=1)
    chosen[none, rng.integers(0, len(GENERIC_FAMILY), int(none.sum()))] = True
    out = x.copy()
    for j, (_, apply, _) in enumerate(GENERIC_FAMILY):
        rows = np.flatnonzero(chosen[:, j])
        if rows.size:
            out[rows] = apply(out[rows], rng)
    return out.astype(x.dtype)

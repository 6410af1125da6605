"""Learned manipulation mechanisms M -> X for images: the "transform" m pathway.

NN_M^p maps m to a parameter vector ``theta(m) = head(trunk(m)) - head(trunk(0))``: exactly zero
at do(m=0) and, because the head starts at zero, zero for every m before fine-tuning. Each
mechanism is the identity at ``theta = 0`` and acts on the canonical Bernoulli mean image
p(x|y,z,do(m=0)) produced from y and z:

- ``warp``: affine resampling (shift, scale, rotation, shear), the same for every channel, 6
  parameters;
- ``blur``: a normalised 5x5 kernel ``delta + beta (G_s - delta)`` (blur for beta > 0, sharpen
  for beta < 0), the same for every channel, 2 parameters;
- ``photometric``: gain and offset ``g_c p + b_c`` per channel (a colour cast on RGB), ``2 C``
  parameters (gains first, then offsets);
- ``outlier``: a mixture ``p + eps (u_c - p)`` with one weight and a corruption level per
  channel, which lets noise and outliers be explained by m instead of by y or z, ``1 + C``
  parameters;
- ``field``: a spatially varying mixture ``p + w (u_c - p)`` whose weight ``w`` (shared by the
  channels) and levels ``u_c`` are smooth maps (a 7x7 grid per map, bilinearly upsampled), which
  lets a local veil, band or stain be explained by m: ``(1 + C) * 49`` parameters;
- ``clean``: on the inference side only, an m-gated residual conv that q(z|x,y,m) applies after
  undoing warp and photometric change, 1 parameter.

For greyscale images (C = 1) the sizes are those of the first, MNIST-only version (2, 2, 2 * 49).

The inference network q(z|x,y,m) sees the observed image mapped back through the inverse of the
invertible mechanisms (field, photometric, warp), so that z is inferred from a canonical image.
Where the field covers a pixel (``w -> 1``), its exact inverse ``(x - w u) / (1 - w)`` divides by
almost nothing and turns whatever covers the digit into extreme values. With
``field_inverse="mask"`` a covered pixel is *missing* instead: where its visibility ``v = 1 - w``
is at least ``MASK_VISIBILITY`` the inverse is exact (a translucent veil is undone), below it the
canonical pixel is ``(x - w u) v / MASK_VISIBILITY^2``, which fades to the background as the field
takes the pixel (continuous at the floor). The likelihood of a covered pixel is already the
occluder's: ``p + w (u - p) -> u`` does not depend on y or z.

``GLOBAL_TRANSFORMS`` act on the whole image; :func:`identity_log_prior` keeps them near the
identity (a Gaussian factor on their parameters) so that a local corruption is explained by the
field, not by degrading the whole image.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cama.config import Transform
from cama.layers import mlp

FIELD_GRID = 7
PROB_EPS = 1e-6
FIELD_MIN_KEEP = 0.05  # the field's exact inverse divides by 1 - w, kept at least this
MASK_VISIBILITY = 0.3  # "mask": pixels less visible than this are read as missing
FieldInverse = Literal["divide", "mask"]
GLOBAL_TRANSFORMS: tuple[Transform, ...] = ("warp", "blur", "photometric", "outlier")


def param_sizes(channels: int = 1) -> dict[Transform, int]:
    """How many parameters each mechanism takes on ``channels``-channel images."""
    return {
        "warp": 6,
        "blur": 2,
        "photometric": 2 * channels,
        "outlier": 1 + channels,
        "field": (1 + channels) * FIELD_GRID * FIELD_GRID,
        "clean": 1,
    }


def bernoulli_mean(logits: Tensor) -> Tensor:
    """``sigmoid(logits)`` written as ``exp(-|l|)`` ratios, accurate relative to tiny probabilities.

    The same value as ``torch.sigmoid`` (which computes ``1 / (1 + exp(-l))``, the ``l >= 0``
    branch here); written out so that an exported graph does not use ONNX Runtime's ``Sigmoid``,
    whose error is about 1e-7 absolute: 2% of a probability of 1e-6, which the log-likelihood of a
    bright pixel that a class hypothesis says is dark turned into 0.01-0.02 nats per pixel.
    ``exp`` is accurate relative to its value on both; ``e <= 1``, so neither branch overflows
    (nor its gradient). ``-|l|`` is taken with ``where``, not ``abs``, whose gradient at 0 is 0.
    """
    e = torch.exp(torch.where(logits >= 0, -logits, logits))
    return torch.where(logits >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


class MechanismNetwork(nn.Module):
    """NN_M^p of the transform pathway: m -> theta(m), zero at m = 0 and at initialisation."""

    def __init__(
        self, dim_m: int, layers: tuple[int, ...], transforms: tuple[Transform, ...], channels: int = 1
    ) -> None:
        super().__init__()
        self.transforms = transforms
        self.sizes = param_sizes(channels)
        self.trunk = mlp((dim_m, *layers), final_activation=True)
        self.head = nn.Linear(layers[-1], sum(self.sizes[t] for t in transforms))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, m: Tensor) -> dict[Transform, Tensor]:
        """``m (..., dM)`` -> the parameters of each mechanism, ``(..., size)`` each."""
        flat = torch.cat([m.reshape(-1, m.shape[-1]), m.new_zeros(1, m.shape[-1])])
        out_flat = self.head(self.trunk(flat))  # one call, so m = 0 rows match the reference row
        raw = (out_flat[:-1] - out_flat[-1:]).view(*m.shape[:-1], -1)
        out: dict[Transform, Tensor] = {}
        start = 0
        for name in self.transforms:
            out[name] = raw[..., start : start + self.sizes[name]]
            start += self.sizes[name]
        return out


def _affine(theta: Tensor) -> Tensor:
    """Warp parameters ``(N, 6)`` -> affine matrices ``(N, 2, 3)``, the identity at zero."""
    eye = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], device=theta.device, dtype=theta.dtype)
    return (theta + eye).view(-1, 2, 3)


def _invert_affine(a: Tensor) -> Tensor:
    """Inverse of ``[M | t]`` as ``[M^-1 | -M^-1 t]``, closed form for 2x2 ``M``."""
    m00, m01, t0 = a[:, 0, 0], a[:, 0, 1], a[:, 0, 2]
    m10, m11, t1 = a[:, 1, 0], a[:, 1, 1], a[:, 1, 2]
    det = m00 * m11 - m01 * m10
    i00, i01, i10, i11 = m11 / det, -m01 / det, -m10 / det, m00 / det
    return torch.stack([i00, i01, -(i00 * t0 + i01 * t1), i10, i11, -(i10 * t0 + i11 * t1)], dim=1).view(
        -1, 2, 3
    )


def _pixel_centres(n: int, like: Tensor) -> Tensor:
    """Normalised coordinates of the ``n`` pixel centres, ``(2 i + 1) / n - 1`` (align_corners=False).

    Computed in double precision and rounded once, so the value is the same constant wherever the
    graph runs (torch eager, an exported ONNX graph), unlike a traced ``linspace``.
    """
    return torch.tensor([(2 * i + 1) / n - 1 for i in range(n)], dtype=like.dtype, device=like.device)


def _affine_grid(affine: Tensor, h: int, w: int) -> Tensor:
    """``F.affine_grid(affine, (N, C, h, w), align_corners=False)`` written out, ``(N, h, w, 2)``.

    The sampling position of pixel ``(i, j)`` is ``affine @ (x_j, y_i, 1)``, computed as plain
    multiply-adds on the pixel-centre constants: the same arithmetic in torch and in ONNX Runtime,
    and at ``affine`` = identity exactly the constants. The exported decomposition of
    ``affine_grid`` rebuilds the base grid with a ``linspace`` that rounds differently from eager
    torch, moving samples by ~1e-7 pixels; through pixels whose probability is near 0 or 1 that
    was ~0.01 nats of eq. 6's log-weights on the real model (and a 1.5x slower graph).
    """
    xs = _pixel_centres(w, affine).view(1, 1, w)
    ys = _pixel_centres(h, affine).view(1, h, 1)
    a = affine.reshape(-1, 6, 1, 1)
    gx = a[:, 0] * xs + a[:, 1] * ys + a[:, 2]  # (N, h, w)
    gy = a[:, 3] * xs + a[:, 4] * ys + a[:, 5]
    return torch.stack([gx, gy], dim=-1)


def _resample(img: Tensor, affine: Tensor) -> Tensor:
    """Sample ``img (N, C, H, W)`` at ``affine @ grid`` (every channel alike), zeros outside."""
    grid = _affine_grid(affine, img.shape[2], img.shape[3])
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _blur(img: Tensor, theta: Tensor, size: int) -> Tensor:
    """Per-image kernel ``delta + beta (G_s - delta)``, beta = tanh(theta0), s = exp(theta1)."""
    n = img.shape[0]
    beta = torch.tanh(theta[:, 0]).view(n, 1, 1)
    sigma = torch.exp(theta[:, 1]).view(n, 1, 1)
    r = torch.arange(size, device=img.device, dtype=img.dtype) - size // 2
    d2 = (r.view(1, -1, 1) ** 2 + r.view(1, 1, -1) ** 2).expand(n, size, size)
    gauss = torch.softmax((-d2 / (2 * sigma**2)).reshape(n, -1), dim=1).view(n, size, size)
    delta = (d2 == 0).to(img.dtype)
    kernel = delta + beta * (gauss - delta)  # (N, size, size), sums to 1
    # a sum of shifted copies rather than a grouped conv: static shapes, so it exports to ONNX
    h, w = img.shape[2], img.shape[3]
    padded = F.pad(img, (size // 2,) * 4)
    out = torch.zeros_like(img)
    for i in range(size):
        for j in range(size):
            out = out + kernel[:, i, j].view(n, 1, 1, 1) * padded[:, :, i : i + h, j : j + w]
    return out


def _upsample_matrix(n_out: int, n_in: int, like: Tensor) -> Tensor:
    """``(n_out, n_in)`` bilinear interpolation weights (half-pixel centres, edges clamped).

    Built in double precision from constants, so that ``U g U^T`` is the same plain arithmetic in
    torch and in an exported graph (no framework-specific resize kernel).
    """
    rows = []
    for i in range(n_out):
        s = min(max((i + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1.0)
        lo = int(s)
        hi = min(lo + 1, n_in - 1)
        row = [0.0] * n_in
        row[lo] += 1.0 - (s - lo)
        row[hi] += s - lo
        rows.append(row)
    return torch.tensor(rows, dtype=like.dtype, device=like.device)


def _field_maps(theta: Tensor, c: int, h: int, w: int) -> tuple[Tensor, Tensor]:
    """Field parameters ``(N, (1 + C) * g * g)`` -> weight ``tanh`` map ``(N, 1, h, w)`` and level
    ``sigmoid`` maps ``(N, C, h, w)``."""
    g = FIELD_GRID
    grids = theta.view(-1, 1 + c, g, g)
    up = _upsample_matrix(h, g, theta) @ grids @ _upsample_matrix(w, g, theta).T  # (N, 1 + C, h, w)
    return torch.tanh(up[:, :1]), bernoulli_mean(up[:, 1:])


def _photometric(theta: Tensor, c: int) -> tuple[Tensor, Tensor]:
    """Photometric parameters ``(N, 2 C)`` -> per-channel gain ``exp`` and offset, ``(N, C, 1, 1)`` each."""
    return torch.exp(theta[:, :c]).view(-1, c, 1, 1), theta[:, c:].view(-1, c, 1, 1)


def apply_mechanisms(p: Tensor, params: dict[Transform, Tensor], blur_kernel: int) -> Tensor:
    """Manipulate the canonical Bernoulli mean ``p (N, C, H, W)`` with ``params`` ``(N, size)``."""
    c = p.shape[1]
    if "warp" in params:
        p = _resample(p, _affine(params["warp"]))
    if "blur" in params:
        p = _blur(p, params["blur"], blur_kernel)
    if "photometric" in params:
        gain, offset = _photometric(params["photometric"], c)
        p = gain * p + offset
    if "outlier" in params:
        eps = torch.tanh(params["outlier"][:, 0]).view(-1, 1, 1, 1)
        level = bernoulli_mean(params["outlier"][:, 1:]).view(-1, c, 1, 1)
        p = p + eps * (level - p)
    if "field" in params:
        weight, level_map = _field_maps(params["field"], c, p.shape[2], p.shape[3])
        p = p + weight * (level_map - p)
    return p.clamp(PROB_EPS, 1.0 - PROB_EPS)


class Cleaner(nn.Module):
    """Part of NN_M^q: an m-gated residual conv ``x + gamma(m) r(x)`` before q(z|x,y,m)'s encoder."""

    def __init__(self, channels: int, image_channels: int = 1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(image_channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, image_channels, 3, padding=1),
        )

    def forward(self, x: Tensor, gamma: Tensor) -> Tensor:
        """``x (N, C, H, W)``, ``gamma (N, 1)``."""
        out: Tensor = x + gamma.view(-1, 1, 1, 1) * self.net(x)
        return out


def identity_log_prior(params: dict[Transform, Tensor], std: float) -> Tensor:
    """``log f(theta) = -sum_i theta_i^2 / (2 std^2)`` over the parameters of the global mechanisms
    (:data:`GLOBAL_TRANSFORMS`), ``(...)`` like the parameters' leading shape: an unnormalised
    Gaussian factor on m's prior through theta(m), largest (0) at the identity."""
    parts = [params[name].pow(2).sum(-1) for name in GLOBAL_TRANSFORMS if name in params]
    if not parts:
        return next(iter(params.values())).new_zeros(next(iter(params.values())).shape[:-1])
    return -torch.stack(parts).sum(0) / (2.0 * std * std)


def canonicalize(
    x: Tensor,
    params: dict[Transform, Tensor],
    cleaner: Cleaner | None,
    field_inverse: FieldInverse = "divide",
) -> Tensor:
    """Map observed images ``(N, C, H, W)`` back through the invertible mechanisms; the field's
    covered pixels are divided back (``"divide"``) or treated as missing (``"mask"``)."""
    c = x.shape[1]
    if "field" in params:
        weight, level_map = _field_maps(params["field"], c, x.shape[2], x.shape[3])
        if field_inverse == "mask":
            visible = 1.0 - weight
            fade = visible.clamp_max(MASK_VISIBILITY) / MASK_VISIBILITY  # 1 down to 0 as w -> 1
            x = (x - weight * level_map) * fade / visible.clamp_min(MASK_VISIBILITY)
        else:
            x = (x - weight * level_map) / (1.0 - weight).clamp_min(FIELD_MIN_KEEP)
    if "photometric" in params:
        gain, offset = _photometric(params["photometric"], c)
        x = (x - offset) / gain
    if "warp" in params:
        x = _resample(x, _invert_affine(_affine(params["warp"])))
    if cleaner is not None and "clean" in params:
        x = cleaner(x, params["clean"])
    return x

"""The per-input scores :mod:`benchmarks.drift` measures beside CAMA's rules (higher: more unusual).

- the maximum softmax probability (Hendrycks & Gimpel, 2017), ``-max_c softmax(f(x))_c``, and the
  energy score (Liu et al., 2020), ``E(x) = -logsumexp_c f_c(x)``, of a discriminative baseline's
  logits ``f(x)`` (:func:`training.baselines.load_baseline`);
- CAMA's ``-log p(x)`` raw, corrected by input complexity (Serrà et al., 2020,
  :func:`cama.novelty.complexity_corrected`) and by a likelihood ratio against a background model
  (Ren et al., 2019): ``-(log p(x) - log p_bg(x))``, where the background is a product of
  per-pixel Bernoullis fitted on training images of which a share ``MUTATION`` of the pixels is
  replaced by uniform noise (the paper's perturbation; its background model is a second copy of
  the full model, which this one is not).

The baselines' penultimate activations and softmax outputs also feed the stream detectors of
:mod:`benchmarks.drift_online`.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training.baselines import BNCNN, DNN, load_baseline

BASELINES = {
    "dnn_generic": Path("models/mnist_dnn_generic.pt"),
    "bncnn_flat": Path("models/mnist_bncnn_flat.pt"),
}
MUTATION = 0.2  # share of pixels the background model's training images replace by noise (not tuned)
PROB_EPS = 1e-4  # the background's pixel probabilities are kept in [eps, 1 - eps]
BATCH = 1000


def code_length(x: np.ndarray) -> np.ndarray:
    """``L(x)``: the bits of each image's 8-bit levels ``round(255 x)`` compressed by zlib (DEFLATE,
    level 9), the complexity estimate of Serrà et al. (2020); ``x`` is ``(B, ...)`` in [0, 1], returns
    ``(B,)``. Images decoded from PNG/JPEG are exactly ``levels / 255``, so their levels are the file's."""
    levels = np.rint(np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    rows = levels.reshape(len(levels), -1)
    return np.array([8.0 * len(zlib.compress(row.tobytes(), 9)) for row in rows])


def complexity_corrected(log_px: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Serrà et al. (2020)'s score ``S(x) = -log2 p(x) - L(x)`` in bits: the model's code length less
    a generic compressor's; higher is more unusual. ``log_px`` in nats, ``bits`` from
    :func:`code_length`."""
    return np.asarray(-np.asarray(log_px, dtype=np.float64) / math.log(2.0) - np.asarray(bits))


@dataclass(frozen=True)
class BaselineOutputs:
    """A discriminative baseline's logits ``(N, C)`` and penultimate activations ``(N, H)``."""

    logits: np.ndarray
    features: np.ndarray

    @property
    def msp(self) -> np.ndarray:
        """``-max_c softmax(f(x))_c``: the maximum softmax probability, negated."""
        return np.asarray(-torch.softmax(torch.from_numpy(self.logits), 1).max(1).values.numpy())

    @property
    def energy(self) -> np.ndarray:
        """``E(x) = -logsumexp_c f_c(x)`` (temperature 1)."""
        return np.asarray(-torch.logsumexp(torch.from_numpy(self.logits), 1).numpy())

    @property
    def softmax(self) -> np.ndarray:
        return np.asarray(torch.softmax(torch.from_numpy(self.logits), 1).numpy())


def head_split(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The network up to its last linear layer's input, and that layer (DNN and BN-CNN)."""
    if isinstance(model, DNN):  # Sequential(..., ReLU, Dropout, Linear)
        layers = list(model.net)
        return nn.Sequential(*layers[:-1]), layers[-1]
    if isinstance(model, BNCNN):  # features, then Sequential(..., ReLU, Linear)
        head = list(model.head)
        return nn.Sequential(model.features, *head[:-1]), head[-1]
    raise TypeError(f"no penultimate layer known for {type(model).__name__}")


@torch.inference_mode()
def baseline_outputs(model: nn.Module, x: np.ndarray) -> BaselineOutputs:
    """Logits and penultimate activations of a baseline in eval mode, in batches."""
    model.eval()
    body, last = head_split(model)
    logits, features = [], []
    for start in range(0, len(x), BATCH):
        h = body(torch.from_numpy(np.ascontiguousarray(x[start : start + BATCH], dtype=np.float32)))
        features.append(h.numpy())
        logits.append(last(h).numpy())
    return BaselineOutputs(np.concatenate(logits), np.concatenate(features))


def load_baselines() -> dict[str, nn.Module]:
    return {name: load_baseline(path)[0] for name, path in BASELINES.items()}


@dataclass(frozen=True)
class PixelBackground:
    """A product of per-pixel Bernoullis, ``log p_bg(x) = sum_i x_i log q_i + (1 - x_i) log(1 - q_i)``
    (the likelihood CAMA's decoder uses), with ``q`` the mean of perturbed training images."""

    q: np.ndarray  # (D,)

    @classmethod
    def fit(cls, x: np.ndarray, mutation: float = MUTATION, seed: int = 0) -> PixelBackground:
        """``q`` from images ``x`` whose pixels are each replaced by Uniform(0, 1) with probability
        ``mutation``."""
        rng = np.random.default_rng(seed)
        flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        mutate = rng.random(flat.shape) < mutation
        perturbed = np.where(mutate, rng.random(flat.shape), flat)
        return cls(np.clip(perturbed.mean(axis=0), PROB_EPS, 1.0 - PROB_EPS))

    def log_px(self, x: np.ndarray) -> np.ndarray:
        flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        return np.asarray(flat @ np.log(self.q) + (1.0 - flat) @ np.log1p(-self.q))

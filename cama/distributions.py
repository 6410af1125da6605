"""Diagonal-Gaussian helpers shared by every CAMA objective.

All functions reduce over the last (feature) dimension and keep every leading dimension,
so they work on the ``(C, K, B, D)`` layout used when classes and samples are enumerated.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_LOG_2PI = math.log(2.0 * math.pi)


def reparameterize(mu: Tensor, logvar: Tensor, eps: Tensor) -> Tensor:
    """Sample ``mu + sigma * eps``; ``eps`` is passed in so that sampling is replayable."""
    return mu + torch.exp(0.5 * logvar) * eps


def log_normal(x: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """``log N(x; mu, diag(exp(logvar)))`` summed over the last dimension."""
    return -0.5 * (_LOG_2PI + logvar + (x - mu) ** 2 * torch.exp(-logvar)).sum(-1)


def log_standard_normal(x: Tensor) -> Tensor:
    """``log N(x; 0, I)`` summed over the last dimension (the priors p(z) and p(m))."""
    return -0.5 * (_LOG_2PI + x**2).sum(-1)


def kl_to_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """Closed-form ``KL(N(mu, diag(exp(logvar))) || N(0, I))`` summed over the last dimension."""
    return 0.5 * (torch.exp(logvar) + mu**2 - 1.0 - logvar).sum(-1)

"""The interface every CAMA variant implements, so that one copy of the math serves them all.

Shapes follow one convention: ``C`` class hypotheses, ``K`` samples, ``B`` data points.
A label tensor ``y`` is one-hot, ``(C, 1, 1, num_classes)`` to enumerate every class for every
data point or ``(1, 1, B, num_classes)`` for one given label per data point.
``cond`` carries the extra observed variables of a model (``None`` for images; parents ``a`` and
co-parents ``c`` for measurement data, eq. 9-11).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn


class CamaModel(Protocol):
    """p(x, y, z, m [, a, c]) with q(z, m | x, y [, a, c]) = q(z | x, y, m [, a, c]) q(m | x)."""

    num_classes: int
    dim_z: int
    dim_m: int

    def infer_m(self, x: Tensor, cond: Any) -> tuple[Tensor, Tensor]:
        """q(m|x): mean and log-variance, ``(B, dM)`` each."""
        ...

    def prepare(self, x: Tensor, m: Tensor, cond: Any) -> Any:
        """Work that depends on x and m but not on y or z, done once per ``m`` of shape ``(K, B, dM)``."""
        ...

    def infer_z(self, ctx: Any, y: Tensor) -> tuple[Tensor, Tensor]:
        """q(z|x, y, m [, a, c]): mean and log-variance, ``(C, K, B, dZ)`` each."""
        ...

    def log_likelihood(self, x: Tensor, ctx: Any, y: Tensor, z: Tensor) -> Tensor:
        """log p(x | y, z, m [, c]) summed over x's dimensions, ``(C, K, B)``."""
        ...

    def log_prior_y(self, y: Tensor, cond: Any) -> Tensor:
        """log p(y) (images) or log p(y|a) (measurement data), broadcastable to ``(C, 1, B)``."""
        ...

    def log_prior_mechanisms(self, ctx: Any) -> Tensor:
        """log f(theta(m)): an unnormalised factor on p(m) through the m effect (0 where none),
        ``(K, B)``; part of every ELBO's log p(m), not of eq. 6's weights."""
        ...

    def m_parameters(self) -> list[nn.Parameter]:
        """The parameters of NN_M^p and NN_M^q: the only ones test-time fine-tuning may change."""
        ...

    def parameters(self, recurse: bool = True) -> Any: ...

    def named_parameters(self, prefix: str = "", recurse: bool = True) -> Any: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> Any: ...


def all_classes(num_classes: int, device: torch.device | None = None) -> Tensor:
    """One-hot labels for every class, ``(C, 1, 1, C)``."""
    return torch.eye(num_classes, device=device).view(num_classes, 1, 1, num_classes)


def given_labels(labels: Tensor, num_classes: int) -> Tensor:
    """One-hot labels for given class indices ``(B,)``, as ``(1, 1, B, C)``."""
    return nn.functional.one_hot(labels.long(), num_classes).float().view(1, 1, -1, num_classes)

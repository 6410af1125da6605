"""Discriminative baselines (paper appendix B and C) and their self-describing checkpoints.

- ``DNN``: the appendix-C MNIST MLP, hidden widths [512, 256, 126, 512], ReLU, dropout
  [0.25, 0.25, 0.25, 0.5], 10 logits.
- ``SmallCNN``: the 4-convolution keras ``cifar10_cnn`` network of appendix B, on 1x28x28.
- ``BNCNN``: a small CNN with BatchNorm after every convolution, the model TENT adapts.
- ``PoolCNN``: the appendix-C CIFAR-binary CNN, 3 x {conv 3x3, ReLU, max-pool} with [128, 128, 128]
  channels and an MLP [4*4*128, 1000, 1000] to 2 logits.

Checkpoints are the core's (``cama.checkpoint``): config (with its ``kind``), weights, provenance
and metrics; this module registers the baselines' kinds, so that :func:`load_baseline` (and
``cama.checkpoint.load_checkpoint``) rebuild the model with no training code.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from cama.checkpoint import Checkpoint, CheckpointError, load_checkpoint, register_model_kind, save_checkpoint

BaselineKind = Literal["dnn", "cnn", "bncnn", "pool_cnn"]


class BaselineConfigError(ValueError):
    """An unknown baseline kind, or a config with fields its kind does not have."""


# --- configs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DNNConfig:
    """The appendix-C discriminative DNN: an MLP on the flattened image."""

    kind: Literal["dnn"] = "dnn"
    input_dim: int = 28 * 28
    hidden: tuple[int, ...] = (512, 256, 126, 512)
    dropout: tuple[float, ...] = (0.25, 0.25, 0.25, 0.5)
    num_classes: int = 10

    def __post_init__(self) -> None:
        if len(self.hidden) != len(self.dropout):
            raise ValueError(f"{len(self.hidden)} hidden layers but {len(self.dropout)} dropout rates")


@dataclass(frozen=True)
class SmallCNNConfig:
    """keras ``cifar10_cnn``: conv32-conv32-pool-drop-conv64-conv64-pool-drop-dense512-drop-10."""

    kind: Literal["cnn"] = "cnn"
    in_channels: int = 1
    image_size: int = 28
    channels: tuple[int, int] = (32, 64)
    dense: int = 512
    dropout: tuple[float, float, float] = (0.25, 0.25, 0.5)
    num_classes: int = 10


@dataclass(frozen=True)
class BNCNNConfig:
    """Three conv-BN-ReLU blocks (the first two max-pooled), global average pool, linear head."""

    kind: Literal["bncnn"] = "bncnn"
    in_channels: int = 1
    channels: tuple[int, ...] = (32, 64, 64)
    pooled_blocks: int = 2
    num_classes: int = 10
    # "gap": global average pooling (nearly shift-invariant by construction); "flatten": a dense
    # head on the flattened 7x7 feature map, like the keras CNN of appendix B, with BatchNorm
    head: Literal["gap", "flatten"] = "gap"
    dense: int = 256


@dataclass(frozen=True)
class PoolCNNConfig:
    """The appendix-C CIFAR-binary CNN: conv blocks {conv kxk SAME, ReLU, max-pool 2}, then an MLP.

    The appendix's last layer has 10 units (CIFAR-10); CIFAR-binary has 2 classes, so 2 logits.
    ``dropout`` (not in the appendix, 0 by default) is applied after each hidden dense layer.
    """

    kind: Literal["pool_cnn"] = "pool_cnn"
    in_channels: int = 3
    image_size: int = 32
    channels: tuple[int, ...] = (128, 128, 128)
    kernel: int = 3
    hidden: tuple[int, ...] = (1000, 1000)
    dropout: float = 0.0
    num_classes: int = 2


BaselineConfig = DNNConfig | SmallCNNConfig | BNCNNConfig | PoolCNNConfig


# --- networks ---------------------------------------------------------------------------------


class DNN(nn.Module):
    """Linear-ReLU-Dropout blocks on the flattened image, then a linear layer to the logits."""

    def __init__(self, config: DNNConfig | None = None) -> None:
        super().__init__()
        self.config = config or DNNConfig()
        layers: list[nn.Module] = [nn.Flatten()]
        width = self.config.input_dim
        for hidden, rate in zip(self.config.hidden, self.config.dropout, strict=True):
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(rate)]
            width = hidden
        layers.append(nn.Linear(width, self.config.num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, C)`` of images ``(B, 1, 28, 28)``."""
        logits: Tensor = self.net(x)
        return logits


class SmallCNN(nn.Module):
    """The keras cifar10_cnn architecture: 'same' then 'valid' 3x3 convolutions in two stages."""

    def __init__(self, config: SmallCNNConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or SmallCNNConfig()
        c1, c2 = cfg.channels
        d1, d2, d3 = cfg.dropout
        self.features = nn.Sequential(
            nn.Conv2d(cfg.in_channels, c1, 3, padding=1),  # (B, c1, 28, 28)
            nn.ReLU(),
            nn.Conv2d(c1, c1, 3),  # (B, c1, 26, 26)
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, c1, 13, 13)
            nn.Dropout(d1),
            nn.Conv2d(c1, c2, 3, padding=1),  # (B, c2, 13, 13)
            nn.ReLU(),
            nn.Conv2d(c2, c2, 3),  # (B, c2, 11, 11)
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, c2, 5, 5)
            nn.Dropout(d2),
        )
        side = ((cfg.image_size - 2) // 2 - 2) // 2
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * side * side, cfg.dense),
            nn.ReLU(),
            nn.Dropout(d3),
            nn.Linear(cfg.dense, cfg.num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, C)`` of images ``(B, 1, 28, 28)``."""
        logits: Tensor = self.head(self.features(x))
        return logits


class BNCNN(nn.Module):
    """conv3x3-BN-ReLU(-maxpool) blocks, global average pooling and a linear head; no dropout.

    Without dropout, ``model.train()`` (which TENT needs for batch statistics) changes nothing
    but the BatchNorm layers.
    """

    def __init__(self, config: BNCNNConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or BNCNNConfig()
        blocks: list[nn.Module] = []
        width = cfg.in_channels
        for i, channels in enumerate(cfg.channels):
            blocks += [
                nn.Conv2d(width, channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
            ]
            if i < cfg.pooled_blocks:
                blocks.append(nn.MaxPool2d(2))  # 28 -> 14 -> 7
            width = channels
        self.features = nn.Sequential(*blocks)
        if cfg.head == "gap":
            self.head = nn.Sequential(
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, cfg.num_classes)
            )
        else:
            side = 28 // 2**cfg.pooled_blocks
            self.head = nn.Sequential(
                nn.Flatten(),
                nn.Linear(width * side * side, cfg.dense, bias=False),
                nn.BatchNorm1d(cfg.dense),
                nn.ReLU(),
                nn.Linear(cfg.dense, cfg.num_classes),
            )

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, C)`` of images ``(B, 1, 28, 28)``."""
        logits: Tensor = self.head(self.features(x))
        return logits


class PoolCNN(nn.Module):
    """conv-ReLU-maxpool blocks (pooling rounds up: 32 -> 16 -> 8 -> 4), flatten, ReLU MLP, logits."""

    def __init__(self, config: PoolCNNConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or PoolCNNConfig()
        blocks: list[nn.Module] = []
        width, side = cfg.in_channels, cfg.image_size
        for channels in cfg.channels:
            blocks += [
                nn.Conv2d(width, channels, cfg.kernel, padding=cfg.kernel // 2),
                nn.ReLU(),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            width, side = channels, -(-side // 2)
        self.features = nn.Sequential(*blocks, nn.Flatten())  # (B, C' * side * side)
        head: list[nn.Module] = []
        n_in = width * side * side
        for hidden in cfg.hidden:
            head += [nn.Linear(n_in, hidden), nn.ReLU(), nn.Dropout(cfg.dropout)]
            n_in = hidden
        head.append(nn.Linear(n_in, cfg.num_classes))
        self.head = nn.Sequential(*head)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, classes)`` of images ``(B, C, H, W)``."""
        logits: Tensor = self.head(self.features(x))
        return logits


BASELINES: dict[str, tuple[type[Any], type[nn.Module]]] = {
    "dnn": (DNNConfig, DNN),
    "cnn": (SmallCNNConfig, SmallCNN),
    "bncnn": (BNCNNConfig, BNCNN),
    "pool_cnn": (PoolCNNConfig, PoolCNN),
}


def build_baseline(kind: str, config: dict[str, Any] | None = None) -> nn.Module:
    """Instantiate a baseline by kind from a config dict (lists become tuples); defaults if none."""
    if kind not in BASELINES:
        raise BaselineConfigError(f"unknown baseline kind {kind!r}; known: {sorted(BASELINES)}")
    cfg_type, model_type = BASELINES[kind]
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in (config or {"kind": kind}).items()}
    known = {f.name for f in dataclasses.fields(cfg_type)}
    unknown = set(values) - known
    if unknown:
        raise BaselineConfigError(f"config has unknown fields {sorted(unknown)}")
    if values.get("kind", kind) != kind:
        raise BaselineConfigError(f"config kind {values['kind']!r} does not match {kind!r}")
    model: nn.Module = model_type(cfg_type(**values))
    return model


# --- checkpoints: the core's format (``cama.checkpoint``), with the baselines' kinds registered ---

for _kind, (_config, _model) in BASELINES.items():
    register_model_kind(_kind, _config, _model)


def save_baseline(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    provenance: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
) -> str:
    """Write the baseline as a core checkpoint (config + weights + provenance + metrics); SHA-256."""
    return save_checkpoint(path, model, provenance=provenance, metrics=metrics)


def load_baseline(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, Checkpoint]:
    """Rebuild the baseline a checkpoint describes (:func:`cama.checkpoint.load_checkpoint`) and
    refuse a checkpoint of another kind (a CAMA)."""
    model, meta = load_checkpoint(path, map_location=map_location)
    if meta.kind not in BASELINES:
        raise CheckpointError(f"{path} holds a {meta.kind!r} model, not a baseline ({sorted(BASELINES)})")
    return model, meta


ArrayLike = np.ndarray | Tensor


def as_tensor(x: ArrayLike) -> Tensor:
    """A tensor view of an array (or the tensor itself)."""
    return x if isinstance(x, Tensor) else torch.from_numpy(np.ascontiguousarray(x))


@torch.no_grad()
def predict(model: nn.Module, x: ArrayLike, batch_size: int = 1000) -> np.ndarray:
    """Predicted labels ``(N,)`` of the model in eval mode (its mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    xt = as_tensor(x)
    labels = [
        model(xt[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, xt.shape[0], batch_size)
    ]
    model.train(was_training)
    return torch.cat(labels).numpy()


def evaluate_accuracy(model: nn.Module, x: ArrayLike, y: ArrayLike, batch_size: int = 1000) -> float:
    """Accuracy of the model (eval mode: dropout off, BatchNorm on running statistics)."""
    labels = as_tensor(y).numpy()
    return float((predict(model, x, batch_size) == labels).mean())

"""The measurement study's parts (paper section 3.2, figs. 13-15): what one run measures, the
appendix-C DNN baseline and its training, and fine-tuned copies of a measurement CAMA (eq. 8).
``experiments.evaluate_measurement`` and ``experiments.evaluate_adversarial`` build on them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")
import numpy as np
import torch
import torch.nn.functional as F

from cama.adapt import MEASUREMENT_RECIPE, FinetuneConfig, finetune
from cama.measurement_model import (
    CoparentMechanism,
    MeasurementCama,
    MeasurementPathway,
    with_m_pathway,
)
from training.baselines import DNN, DNNConfig
from training.measurement_data import GeneratorConfig
from training.measurement_schema import Encoded
from training.measurement_training import TrainConfig, as_tensors


@dataclass(frozen=True)
class DNNTrainConfig:
    """The baseline's training: Adam, mini-batches, best validation accuracy kept."""

    epochs: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    val_every: int = 5


@dataclass(frozen=True)
class EvalConfig:
    """What one evaluation run measures."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    shifts: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0)
    k: int = 10
    pathways: tuple[MeasurementPathway, ...] = ("affine", "appendix")
    tiny: bool = False
    coparent_mechanism: CoparentMechanism = "mlp"  # MeasurementCamaConfig's (a model-class ablation)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = MEASUREMENT_RECIPE  # the recipe the service uses for the model
    dnn: DNNTrainConfig = field(default_factory=DNNTrainConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)


def shift_key(s: float) -> str:
    """``0.5``, ``1``, ``2``, ``3``: the magnitude as written in metric keys."""
    return f"{s:g}"


# --- the DNN baseline ----------------------------------------------------------------------------


def dnn_inputs(data: Encoded) -> torch.Tensor:
    """The concatenated ``[A, C, X]`` the discriminative baseline sees."""
    return torch.from_numpy(np.concatenate([data.a, data.c, data.x], axis=1))


def train_dnn(train_data: Encoded, val_data: Encoded, cfg: DNNTrainConfig, seed: int) -> DNN:
    """The appendix-C measurement DNN, cross-entropy with Adam, best validation accuracy kept."""
    assert train_data.y is not None
    torch.manual_seed(seed)
    net = DNN(
        DNNConfig(
            input_dim=dnn_inputs(train_data).shape[1],
            hidden=(64, 16, 32),
            dropout=(0.25, 0.25, 0.5),
            num_classes=int(train_data.y.max()) + 1,
        )
    )
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    x, y = dnn_inputs(train_data), torch.from_numpy(train_data.y)
    rng = np.random.default_rng(seed)
    best, best_state = -1.0, copy.deepcopy(net.state_dict())
    for epoch in range(1, cfg.epochs + 1):
        net.train()
        order = torch.from_numpy(rng.permutation(len(train_data)))
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            opt.step()
        if epoch % cfg.val_every == 0:
            acc = dnn_accuracy(net, val_data)
            if acc > best:
                best, best_state = acc, copy.deepcopy(net.state_dict())
    net.load_state_dict(best_state)
    net.eval()
    return net


@torch.no_grad()
def dnn_accuracy(net: DNN, data: Encoded) -> float:
    """Accuracy of the baseline on labelled rows."""
    net.eval()
    return float((net(dnn_inputs(data)).argmax(1).numpy() == data.y).mean())


def finetuned(
    model: MeasurementCama, pathway: MeasurementPathway, replay: Encoded, test: Encoded, cfg: FinetuneConfig
) -> MeasurementCama:
    """A copy of the clean model with ``pathway``, fine-tuned on unlabelled ``test`` (eq. 8)."""
    assert replay.y is not None
    adapted = with_m_pathway(copy.deepcopy(model), pathway)
    clean_x, clean_cond = as_tensors(replay)
    test_x, test_cond = as_tensors(test)
    finetune(
        adapted, clean_x, torch.from_numpy(replay.y), test_x, cfg, clean_cond=clean_cond, test_cond=test_cond
    )
    return adapted

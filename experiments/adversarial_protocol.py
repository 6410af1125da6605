"""The adversarial evaluation's protocol (``experiments.evaluate_adversarial``): the attacks' budgets
and steps per data set, the methods, the models' files, the noise seeds and the sanity checks'
thresholds."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RESULTS = Path("docs/results")
ATTACKS = ("fgsm", "pgd")
METHODS = ("dnn", "cama", "cama_fixed", "cama_eot", "cama_ft", "cama_ft_eot")
EPS = {
    "mnist": (0.05, 0.1, 0.2, 0.3),
    "cifar": (0.01, 0.02, 0.05, 0.1, 0.2),
    "measurement": (0.1, 0.2, 0.5, 1.0),
}
COSTLY_EPS = {"mnist": (0.1, 0.3), "cifar": (0.05,), "measurement": (0.5, 1.0)}  # EOT and fine-tuning
PGD_STEPS = {"mnist": 10, "cifar": 10, "measurement": 20}
BASELINE = {"mnist": "dnn", "cifar": "cnn", "measurement": "dnn"}  # the discriminative model's key
STEPS_EPS = {"mnist": 0.1, "cifar": 0.05}  # the eps of the 10x-steps check


@dataclass(frozen=True)
class ImageData:
    """An image data set of the evaluation: its loader's name and the models' default files."""

    dataset: str  # training.data.load_dataset's name
    checkpoint: str
    baseline: str
    serving_data: str


IMAGE_DATA = {
    "mnist": ImageData(
        "mnist", "models/mnist_cama.pt", "models/mnist_dnn.pt", "models/mnist_serving_data.npz"
    ),
    "cifar": ImageData(
        "cifar_binary",
        "models/cifar_binary_cama.pt",
        "models/cifar_cnn.pt",
        "models/cifar_binary_serving_data.npz",
    ),
}
CHANCE_EPS = 0.5  # MNIST: every model near chance (<= CHANCE_LEVEL) under PGD at this eps
CHANCE_LEVEL = 0.2
EOT_DRAWS = 10
K = 10
MONOTONE_SLACK = 0.02  # a stochastic score may rise this much between neighbouring eps
ATTACK_SEED = 1_000  # draw d of an attack uses the noise of seed ATTACK_SEED + d
FIXED_SEED = 7  # the fixed-noise setting's noise
EVAL_SEED = 0
MEASUREMENT_SEEDS = (0, 1, 2)


def eps_key(eps: float) -> str:
    """``0.05``, ``0.1``, ``1``: eps as written in metric keys."""
    return f"{eps:g}"


def autocast(enabled: bool) -> Any:
    """bf16 autocast on the CPU for the attacker's gradients (float32 when ``enabled`` is False)."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else nullcontext()

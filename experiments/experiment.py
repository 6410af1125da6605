"""Building blocks of the MNIST robustness experiments: splits, manipulated sets, CAMA runs.

The protocol follows appendix C: fine-tuning uses 50% of the manipulated test set (unlabelled)
and accuracy is reported on the other 50%. The split is a seeded permutation of the test set.
"""

from __future__ import annotations

import argparse
import copy
import time
import zlib
from dataclasses import dataclass, replace

import numpy as np
import torch

from cama.adapt import AdaptOutcome, FinetuneConfig, GateConfig, Labelled, adapt_batch, finetune
from cama.config import ImageCamaConfig
from cama.image_model import ImageCama, with_m_pathway
from store.data import ServingData
from training.accuracy import model_device, served_accuracy
from training.data import Mnist, Split
from training.manipulations import named

SPLIT_SEED = 0


@dataclass(frozen=True)
class TestHalves:
    """The manipulated test set split into the half used to adapt and the half used to score."""

    adapt: Split
    score: Split


def halves(test: Split, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the adaptation half and the scoring half of the test set."""
    order = np.random.default_rng(seed).permutation(len(test))
    mid = len(test) // 2
    return order[:mid], order[mid:]


def manipulated_halves(test: Split, manipulation: str, level: float, seed: int = 1) -> TestHalves:
    """Apply ``manipulation`` at ``level`` to the whole test set (seeded) and split it in two."""
    rng = np.random.default_rng([seed, zlib.crc32(manipulation.encode()), round(level * 1000)])
    x = named(manipulation, level)(test.x, rng) if level > 0 else test.x
    adapt_idx, score_idx = halves(test)
    return TestHalves(
        adapt=Split(x[adapt_idx], test.y[adapt_idx]),
        score=Split(x[score_idx], test.y[score_idx]),
    )


def table_accuracy(model: ImageCama, split: Split, k: int, *, limit: int | None = None) -> float:
    """Eq. 6 accuracy with the numerics the MNIST tables were published with (docs/results/mnist.md):
    :func:`training.accuracy.served_accuracy` under bfloat16 autocast, all K samples for every input
    (no first-sample screen), noise seed 0 drawn in chunks of 50 inputs (500 on a GPU)."""
    chunk = 500 if model_device(model).type == "cuda" else 50
    x, y = split.x[:limit], split.y[:limit]
    return served_accuracy(model, x, y, k=k, seed=0, screen=None, chunk=chunk, bf16=True)


def variant(clean: ImageCama, pathway: str) -> ImageCama:
    """The clean-trained model with the ``additive`` (appendix C) or ``transform`` m pathway."""
    if pathway == clean.config.m_pathway:
        return copy.deepcopy(clean)
    new = with_m_pathway(clean, pathway, q_m_logvar_init=ImageCamaConfig.q_m_logvar_init)
    return new.to(model_device(clean))


def replay_set(mnist: Mnist, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A labelled sample of clean training data: eq. 8's clean term."""
    idx = np.random.default_rng(seed).choice(len(mnist.train), size=size, replace=False)
    return torch.from_numpy(mnist.train.x[idx]), torch.from_numpy(mnist.train.y[idx])


def zero_m_inference(model: ImageCama) -> None:
    """Zero q(m|x)'s mean output layer: every x gets the same m (the saddle of docs/m_pathway.md)."""
    last = model.q_m_mlp[-1]
    assert isinstance(last, torch.nn.Linear)
    with torch.no_grad():
        last.weight[: model.dim_m] = 0.0
        last.bias[: model.dim_m] = 0.0


def start_model(
    clean: ImageCama, pathway: str, *, reinit_q_m: bool = True, zero_q_m: bool = False
) -> ImageCama:
    """A copy of ``clean`` with ``pathway``, ready to be fine-tuned.

    ``reinit_q_m``: a do(m=0)-trained additive model's q(m|x) was never trained and gets the same
    symmetry-breaking start as the transform pathway; a model trained with eq. 5 keeps its own.
    ``zero_q_m`` (the ablation): start from a zero q(m|x) mean instead, the same m for every x.
    """
    model = variant(clean, pathway)
    if zero_q_m:
        zero_m_inference(model)
    elif pathway == "additive" and reinit_q_m:
        model.reinit_m_inference()  # the same fair start as the transform pathway gets
    return model


def finetuned(
    clean: ImageCama,
    pathway: str,
    replay: tuple[torch.Tensor, torch.Tensor],
    adapt_x: np.ndarray,
    cfg: FinetuneConfig,
    *,
    log_every: int = 50,
) -> tuple[ImageCama, float]:
    """A fine-tuned copy (eq. 8, NN_M^p and NN_M^q only, no gate) and the seconds it took."""
    model = start_model(clean, pathway)
    t0 = time.perf_counter()

    def progress(fraction: float, step: object) -> None:
        if log_every and round(fraction * cfg.steps(len(adapt_x))) % log_every == 0:
            print(f"  ft {fraction:6.1%} {step}", flush=True)

    device = model_device(model)
    clean_x, clean_y = replay[0].to(device), replay[1].to(device)
    finetune(model, clean_x, clean_y, torch.from_numpy(adapt_x).to(device), cfg, on_progress=progress)
    return model, time.perf_counter() - t0


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    """The options that change the adaptation recipe of an evaluation (``--ft-*``)."""
    parser.add_argument("--ft-steps", type=int, default=None, help="cap fine-tuning steps (smoke runs)")
    parser.add_argument(
        "--ft-schedule", choices=["constant", "cosine"], default=None, help="fine-tuning step size schedule"
    )
    parser.add_argument(
        "--ft-decay",
        type=float,
        default=None,
        help="with --ft-schedule cosine: decay over this last fraction of the run (decay_fraction)",
    )


def recipe_from_args(args: argparse.Namespace, base: FinetuneConfig) -> FinetuneConfig:
    """``base`` with the ``--ft-*`` options of :func:`add_recipe_args` applied."""
    changes = {"max_steps": args.ft_steps, "lr_schedule": args.ft_schedule, "decay_fraction": args.ft_decay}
    return replace(base, **{k: v for k, v in changes.items() if v is not None})


def adapt_as_served(
    model: ImageCama,
    adapt_x: np.ndarray,
    recipe: FinetuneConfig,
    gate: GateConfig,
    serving: ServingData,
    *,
    keep_refused: bool = False,
) -> tuple[ImageCama, AdaptOutcome]:
    """A copy of ``model`` after ``POST /adapt``'s code path (``cama.adapt.adapt_batch``) on the
    unlabelled ``adapt_x``, with the model's replay and canary sets; a refused job leaves the copy
    as it was unless ``keep_refused`` (an evaluation that scores what the gate refused)."""
    device = model_device(model)
    adapted = copy.deepcopy(model)

    def labelled(x: np.ndarray, y: np.ndarray) -> Labelled:
        return Labelled(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))

    outcome = adapt_batch(
        adapted,
        torch.from_numpy(adapt_x).to(device),
        recipe,
        gate,
        replay=labelled(serving.replay.x, serving.replay_y),
        canary=labelled(serving.canary.x, serving.canary_y),
        keep_refused=keep_refused,
    )
    return adapted.eval(), outcome

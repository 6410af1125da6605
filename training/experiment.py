"""Building blocks of the MNIST robustness experiments: splits, manipulated sets, CAMA runs.

The protocol follows appendix C: fine-tuning uses 50% of the manipulated test set (unlabelled)
and accuracy is reported on the other 50%. The split is a seeded permutation of the test set.
"""

from __future__ import annotations

import copy
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from cama.adapt import FinetuneConfig, finetune
from cama.config import ImageCamaConfig
from cama.image_model import ImageCama, with_m_pathway
from cama.objectives import bayes_predict
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


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's parameters live on."""
    return next(model.parameters()).device


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (``cuda:N``) or ``auto`` (CUDA when present) as a torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


def cama_accuracy(
    model: ImageCama, split: Split, k: int, *, seed: int = 0, limit: int | None = None, chunk: int = 50
) -> float:
    """Bayes-rule (eq. 6) accuracy with K importance samples per class, fixed noise seed.

    Runs on the model's device (bf16 autocast); the noise generator lives on that device too, so
    a CPU and a CUDA run draw different (equally valid) importance samples.
    """
    model.eval()
    device = model_device(model)
    x, y = split.x[:limit], split.y[:limit]
    gen = torch.Generator(device=device).manual_seed(seed)
    if device.type == "cuda":
        chunk = max(chunk, 500)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        pred = bayes_predict(model, torch.from_numpy(x).to(device), k=k, chunk=chunk, generator=gen)
    return float((pred.labels.cpu().numpy() == y).mean())


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


def finetuned(
    clean: ImageCama,
    pathway: str,
    replay: tuple[torch.Tensor, torch.Tensor],
    adapt_x: np.ndarray,
    cfg: FinetuneConfig,
    *,
    log_every: int = 50,
    reinit_q_m: bool = True,
    zero_q_m: bool = False,
    on_step: Callable[[ImageCama, float], None] | None = None,
) -> tuple[ImageCama, float]:
    """A fine-tuned copy (eq. 8, NN_M^p and NN_M^q only) and the seconds it took.

    ``reinit_q_m``: a do(m=0)-trained additive model's q(m|x) was never trained and gets the same
    symmetry-breaking start as the transform pathway; a model trained with eq. 5 keeps its own.
    ``zero_q_m`` (the ablation): start from a zero q(m|x) mean instead, the same m for every x.
    ``on_step(model, fraction)`` runs after every step (e.g. to keep the iterates).
    """
    model = variant(clean, pathway)
    if zero_q_m:
        zero_m_inference(model)
    elif pathway == "additive" and reinit_q_m:
        model.reinit_m_inference()  # the same fair start as the transform pathway gets
    t0 = time.perf_counter()

    steps = [0]

    def progress(fraction: float, step: object) -> None:
        steps[0] += 1
        if log_every and steps[0] % log_every == 0:
            print(f"  ft {fraction:6.1%} {step}", flush=True)
        if on_step is not None:
            on_step(model, fraction)

    device = model_device(model)
    clean_x, clean_y = replay[0].to(device), replay[1].to(device)
    finetune(model, clean_x, clean_y, torch.from_numpy(adapt_x).to(device), cfg, on_progress=progress)
    return model, time.perf_counter() - t0

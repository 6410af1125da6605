"""Accuracy of CAMA's Bayes-rule prediction as the service answers ``POST /predict``.

One definition for training's validation, the exported checkpoints' test accuracy and the
evaluations of ``experiments/``: eq. 6,

    y* = argmax_c  log (1/K) sum_k p(x|y_c,z_k,m_k) p(y_c) p(z_k) / q(z_k|x,y_c,m_k),

with K importance samples per class of seeded noise, in float32, behind the first-sample screen
(:data:`cama.objectives.SCREEN_MARGIN`; only inputs the first sample leaves undecided get all K),
in chunks of ``chunk`` inputs. The service draws the same estimator's noise from NumPy's generator
seeded by the request; here a ``torch.Generator`` on the model's device is seeded once and drawn
chunk by chunk, so a figure is reproducible for a given ``seed`` and ``chunk``.

A lab figure that was published with other numerics says so at its call site (``bf16=True``:
bfloat16 autocast; ``screen=None``: all K samples for every input).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from cama.objectives import SCREEN_MARGIN, bayes_predict
from cama.protocol import CamaModel

#: the service's default number of importance samples per class (``CAMA_K``)
SERVED_K = 10
#: inputs per eq. 6 pass; the noise is drawn chunk by chunk, so it is part of a figure's recipe
CHUNK = 100


def as_tensor(a: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``a`` as a tensor on ``device`` (no copy where it already is one there)."""
    return (a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a))).to(device)


def model_device(model: nn.Module) -> torch.device:
    """The device a model's parameters live on."""
    return next(model.parameters()).device


@torch.no_grad()
def served_accuracy(
    model: CamaModel,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    cond: Any = None,
    *,
    k: int = SERVED_K,
    seed: int = 0,
    screen: float | None = SCREEN_MARGIN,
    chunk: int = CHUNK,
    bf16: bool = False,
) -> float:
    """The fraction of ``(x, cond)`` whose eq. 6 label is ``y``: K samples per class of noise from
    ``torch.Generator().manual_seed(seed)`` on the model's device, behind the first-sample screen of
    ``screen`` nats (None: all K for every input), in float32 unless ``bf16``."""
    assert isinstance(model, nn.Module)
    model.eval()
    device = model_device(model)
    gen = torch.Generator(device=device).manual_seed(seed)
    inputs = as_tensor(x, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    with autocast:
        pred = bayes_predict(
            model,
            inputs,
            cond,
            k=k,
            chunk=chunk,
            generator=gen,
            screen=screen,
        )
    truth = y.cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    return float((pred.labels.cpu().numpy() == truth).mean())

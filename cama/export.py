"""ONNX export of eq. 6's per-class log-weights, with the importance-sampling noise as graph inputs.

The exported graph computes exactly :func:`cama.objectives.bayes_log_weights` given the same noise:
inputs ``x (B, ...)`` [, ``a (B, dA)``, ``c (B, dC)``], ``noise_m (K, B, dM)``,
``noise_z (C, K, B, dZ)``; output ``log_weights (B, C)``. Batch ``B`` and sample count ``K`` are
both dynamic.

K is folded into the batch before the core is called (sample k of input b becomes input
``k * B + b`` with one sample), because the core's ``- math.log(k)`` would turn a symbolic K into
a constant. Each (k, b) pair is computed independently by the core, so the fold is exact; only
the final log-mean-exp over the K samples is taken here.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cama.objectives import Noise, bayes_log_weights, class_log_weights

OPSET = 18
MAX_BATCH = 1 << 16
MAX_K = 1 << 12
MAX_CLASSES = 1 << 10


class BayesLogWeights(nn.Module):
    """``(x, noise_m, noise_z) -> log_weights (B, C)``: eq. 6 with explicit noise (images)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, noise_m: Tensor, noise_z: Tensor) -> Tensor:
        return folded_log_weights(self.model, x, (), noise_m, noise_z)


class CondBayesLogWeights(BayesLogWeights):
    """``(x, a, c, noise_m, noise_z) -> log_weights (B, C)``: the same for ``cond = (a, c)``."""

    def forward(self, x: Tensor, a: Tensor, c: Tensor, noise_m: Tensor, noise_z: Tensor) -> Tensor:  # type: ignore[override]
        return folded_log_weights(self.model, x, (a, c), noise_m, noise_z)


def folded_log_weights(
    model: nn.Module, x: Tensor, cond: tuple[Tensor, ...], noise_m: Tensor, noise_z: Tensor
) -> Tensor:
    """Eq. 6 log-weights ``(B, C)`` with the K samples folded into the batch (see the module doc)."""
    k, b = noise_m.shape[0], noise_m.shape[1]
    folded = Noise(
        m=noise_m.reshape(1, -1, noise_m.shape[-1]),  # (1, K * B, dM)
        z=noise_z.reshape(noise_z.shape[0], 1, -1, noise_z.shape[-1]),  # (C, 1, K * B, dZ)
    )
    cond_k = tuple(_repeat(part, k) for part in cond) if cond else None
    log_w = bayes_log_weights(model, _repeat(x, k), cond_k, noise=folded)  # type: ignore[arg-type]  # (K * B, C)
    log_w = log_w.reshape(k, b, log_w.shape[-1])  # (K, B, C)
    log_k = torch.log(torch.ones((), dtype=log_w.dtype, device=log_w.device) * k)
    return torch.logsumexp(log_w, dim=0) - log_k


class ClassLogWeights(nn.Module):
    """``(x, labels, noise_m, noise_z) -> log_weights (S, B)``: eq. 6's log-weights of the classes
    ``labels (S, B)`` names per input (``cama.objectives.class_log_weights``), ``noise_m (K, B, dM)``,
    ``noise_z (S, K, B, dZ)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, labels: Tensor, noise_m: Tensor, noise_z: Tensor) -> Tensor:
        return folded_class_log_weights(self.model, x, (), labels, noise_m, noise_z)


class CondClassLogWeights(ClassLogWeights):
    """The same for ``cond = (a, c)``."""

    def forward(  # type: ignore[override]
        self, x: Tensor, a: Tensor, c: Tensor, labels: Tensor, noise_m: Tensor, noise_z: Tensor
    ) -> Tensor:
        return folded_class_log_weights(self.model, x, (a, c), labels, noise_m, noise_z)


def folded_class_log_weights(
    model: nn.Module, x: Tensor, cond: tuple[Tensor, ...], labels: Tensor, noise_m: Tensor, noise_z: Tensor
) -> Tensor:
    """Eq. 6 log-weights ``(S, B)`` of the classes ``labels (S, B)``, the K samples folded into the
    batch (sample k of input b becomes input ``k * B + b``, as in :func:`folded_log_weights`)."""
    k, b, s = noise_m.shape[0], noise_m.shape[1], labels.shape[0]
    folded = Noise(
        m=noise_m.reshape(1, -1, noise_m.shape[-1]),  # (1, K * B, dM)
        z=noise_z.reshape(s, 1, -1, noise_z.shape[-1]),  # (S, 1, K * B, dZ)
    )
    cond_k = tuple(_repeat(part, k) for part in cond) if cond else None
    labels_k = labels.unsqueeze(1).expand(s, k, b).reshape(s, -1)  # (S, K * B)
    log_w = class_log_weights(model, _repeat(x, k), labels_k, cond_k, noise=folded)  # type: ignore[arg-type]
    log_k = torch.log(torch.ones((), dtype=log_w.dtype, device=log_w.device) * k)
    return torch.logsumexp(log_w.reshape(s, k, b), dim=1) - log_k


def _repeat(t: Tensor, k: int) -> Tensor:
    """``(B, ...) -> (K * B, ...)``, sample-major."""
    return t.unsqueeze(0).expand(k, *t.shape).reshape(-1, *t.shape[1:])


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_x: Tensor,
    example_cond: tuple[Tensor, ...] = (),
    *,
    one_class: bool = False,
) -> Path:
    """Export ``model``'s eq. 6 log-weights to ``path`` (opset 18, dynamic batch and K): every
    class (``log_weights (B, C)``), or with ``one_class`` the classes ``labels (S, B)`` names per
    input (``log_weights (S, B)``, noise ``(S, K, B, dZ)``: the screened prediction's second stage).

    ``example_cond`` is ``()`` for images or ``(a, c)`` for measurement data.
    """
    if len(example_cond) not in (0, 2):
        raise ValueError("cond must be () or (a, c)")
    model = model.eval()
    b = example_x.shape[0]
    k = 2 if not one_class else b + 1  # example sizes that differ, so no dimension is mistaken for another
    dim_m, dim_z, classes = (int(getattr(model, name)) for name in ("dim_m", "dim_z", "num_classes"))
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    samples = torch.export.Dim("k", min=1, max=MAX_K)
    noise_m = torch.randn(k, b, dim_m)
    wrapper: nn.Module
    if one_class:
        wrapper = (CondClassLogWeights(model) if example_cond else ClassLogWeights(model)).eval()
        slots = torch.export.Dim("s", min=1, max=MAX_CLASSES)
        n_slots = b + k + 1
        extra: tuple[Tensor, ...] = (torch.arange(n_slots * b).reshape(n_slots, b) % classes,)
        noise_z = torch.randn(n_slots, k, b, dim_z)
        z_dims = {0: slots, 1: samples, 2: batch}
    else:
        wrapper = (CondBayesLogWeights(model) if example_cond else BayesLogWeights(model)).eval()
        extra = ()
        noise_z = torch.randn(classes, k, b, dim_z)
        z_dims = {1: samples, 2: batch}
    names = [
        "x",
        *(["a", "c"] if example_cond else []),
        *(["labels"] if one_class else []),
        "noise_m",
        "noise_z",
    ]
    dynamic: dict[str, Any] = {name: {0: batch} for name in names[:-2] if name != "labels"}
    if one_class:
        dynamic["labels"] = {0: slots, 1: batch}
    dynamic["noise_m"] = {0: samples, 1: batch}
    dynamic["noise_z"] = z_dims
    target = Path(path)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_loggers():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (example_x, *example_cond, *extra, noise_m, noise_z),
            str(target),
            input_names=names,
            output_names=["log_weights"],
            dynamic_shapes=dynamic,
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
        )
    return target


@contextlib.contextmanager
def _quiet_loggers() -> Iterator[None]:
    """The exporter logs every graph pass at INFO; keep only errors while it runs."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir", "onnxscript", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)

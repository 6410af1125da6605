"""TENT: fully test-time adaptation by entropy minimisation (Wang et al., ICLR 2021).

The shape of the reference ``tent.py``: configure the model (train mode, BatchNorm on batch
statistics, only the BN affine parameters learn), collect those parameters, check the setup, take
one step per batch under ``torch.enable_grad()``, reset. Adaptation is online: the logits returned
for batch t come from the model adapted on batches < t (computed before this batch's update).
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from training.baselines import ArrayLike, as_tensor

ModelState = dict[str, Any]
OptimizerState = dict[str, Any]
BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def softmax_entropy(logits: Tensor) -> Tensor:
    """Entropy of the softmax distribution, per row: ``H(p) = -sum_c p_c log p_c``, shape ``(B,)``."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


@torch.enable_grad()
def forward_and_adapt(x: Tensor, model: nn.Module, optimizer: torch.optim.Optimizer) -> Tensor:
    """Forward ``x``, take one step on the mean prediction entropy; return the pre-update logits."""
    outputs: Tensor = model(x)
    loss = softmax_entropy(outputs).mean(0)
    torch.autograd.backward(loss)  # typed, unlike Tensor.backward in this torch
    optimizer.step()
    optimizer.zero_grad()
    return outputs


def collect_params(model: nn.Module) -> tuple[list[nn.Parameter], list[str]]:
    """The affine parameters (weight, bias) of every BatchNorm layer, and their names."""
    params: list[nn.Parameter] = []
    names: list[str] = []
    for module_name, module in model.named_modules():
        if isinstance(module, BATCHNORM_TYPES):
            for param_name, param in module.named_parameters(recurse=False):
                if param_name in ("weight", "bias"):
                    params.append(param)
                    names.append(f"{module_name}.{param_name}")
    return params, names


def configure_model(model: nn.Module) -> nn.Module:
    """Train mode, everything frozen but the BN affine parameters, BN on batch statistics only."""
    model.train()
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, BATCHNORM_TYPES):
            module.requires_grad_(True)
            module.track_running_stats = False
            module.running_mean = None
            module.running_var = None
    return model


def check_model(model: nn.Module) -> None:
    """Refuse a model that :func:`configure_model` has not prepared for TENT."""
    if not model.training:
        raise ValueError("tent needs train mode (BatchNorm on batch statistics)")
    grads = [p.requires_grad for p in model.parameters()]
    if not any(grads):
        raise ValueError("tent needs some parameters to update; call configure_model first")
    if all(grads):
        raise ValueError("tent should not update all parameters; call configure_model first")
    if not any(isinstance(m, BATCHNORM_TYPES) for m in model.modules()):
        raise ValueError("tent needs BatchNorm layers")
    selected = {id(p) for p in collect_params(model)[0]}
    for name, p in model.named_parameters():
        if p.requires_grad != (id(p) in selected):
            raise ValueError(f"parameter {name} is trainable={p.requires_grad}; only BN affine should be")


def copy_model_and_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[ModelState, OptimizerState]:
    """Deep copies of the model's and the optimizer's state dicts, for :meth:`Tent.reset`."""
    return deepcopy(model.state_dict()), deepcopy(optimizer.state_dict())


def load_model_and_optimizer(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: ModelState,
    optimizer_state: OptimizerState,
) -> None:
    """Restore the states taken by :func:`copy_model_and_optimizer`."""
    model.load_state_dict(model_state, strict=True)
    optimizer.load_state_dict(optimizer_state)


def setup_tent(model: nn.Module, lr: float = 1e-3, *, steps: int = 1, episodic: bool = False) -> Tent:
    """Configure ``model`` in place for TENT and wrap it with Adam on the BN affine parameters."""
    model = configure_model(model)
    params, _ = collect_params(model)
    check_model(model)
    optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    return Tent(model, optimizer, steps=steps, episodic=episodic)


class Tent(nn.Module):
    """Adapt a model by entropy minimisation: every forward takes ``steps`` step(s), then predicts.

    ``episodic=True`` resets the model before each batch (no memory across batches).
    """

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 1, episodic: bool = False
    ) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError(f"tent needs at least one step per batch, got {steps}")
        self.model = model
        self.optimizer = optimizer
        self.steps = steps
        self.episodic = episodic
        self.model_state, self.optimizer_state = copy_model_and_optimizer(model, optimizer)

    def forward(self, x: Tensor) -> Tensor:
        """Adapt on ``x`` and return its logits (from the forward before the last update)."""
        if self.episodic:
            self.reset()
        outputs = forward_and_adapt(x, self.model, self.optimizer)
        for _ in range(self.steps - 1):
            outputs = forward_and_adapt(x, self.model, self.optimizer)
        return outputs

    def reset(self) -> None:
        """Restore the model and optimizer to their states at construction, exactly."""
        load_model_and_optimizer(self.model, self.optimizer, self.model_state, self.optimizer_state)


def tent_accuracy(
    model: nn.Module,
    x: ArrayLike,
    y: ArrayLike,
    batch_size: int = 128,
    seed: int = 0,
    *,
    lr: float = 1e-3,
    adapt_x: ArrayLike | None = None,
    online: bool = True,
) -> float:
    """Accuracy of TENT on ``(x, y)``, starting from a copy of the clean ``model``.

    Batches are visited in a seeded random order; each batch is predicted by the model adapted on
    the batches before it (plus its own forward pass), then one entropy step is taken on it. With
    ``adapt_x`` (unlabelled), TENT first runs one online pass over ``adapt_x`` and then goes on
    over ``x``; with ``online=False`` it stops adapting after ``adapt_x`` and scores ``x`` with
    its parameters frozen (BatchNorm still on each test batch's statistics). ``model`` itself is
    not modified.
    """
    tent = setup_tent(deepcopy(model), lr=lr)
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    if adapt_x is not None:
        xa = as_tensor(adapt_x)
        order = torch.from_numpy(rng.permutation(xa.shape[0]))
        for start in range(0, xa.shape[0], batch_size):
            tent(xa[order[start : start + batch_size]].to(device))
    xt, labels = as_tensor(x), as_tensor(y).numpy()
    order = torch.from_numpy(rng.permutation(xt.shape[0]))
    correct = 0
    for start in range(0, xt.shape[0], batch_size):
        idx = order[start : start + batch_size]
        logits: Tensor
        if online:
            logits = tent(xt[idx].to(device))
        else:
            with torch.no_grad():
                logits = tent.model(xt[idx].to(device))
        pred = logits.argmax(1).cpu().numpy()
        correct += int((pred == labels[idx.numpy()]).sum())
    return correct / max(1, xt.shape[0])

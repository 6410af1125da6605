"""SAR: sharpness-aware and reliable entropy minimisation (Niu et al., ICLR 2023), on top of TENT.

The model is configured as TENT configures it (:mod:`training.tent`: train mode, BatchNorm on batch
statistics, only the BN affine parameters learn). Each batch takes one step of

    min_theta  max_{||e|| <= rho}  sum_{x in S(theta)} H(p_{theta+e}(x)),   S = {x : H(p(x)) < E0},

as the paper does it: the entropies of the batch are filtered by the margin ``E0`` (reliable
samples), the gradient of their mean gives the SAM perturbation ``e = rho g / ||g||``, the
entropies at ``theta + e`` of the same samples are filtered again, and the gradient there steps the
unperturbed parameters (SGD with momentum). When the moving average of that second loss (weight
0.9) falls below ``reset_constant``, the model has collapsed to confident predictions and is reset
to its initial state (model recovery). Online: the logits of a batch come from the model before its
update.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from training.tent import (
    check_model,
    collect_params,
    configure_model,
    copy_model_and_optimizer,
    load_model_and_optimizer,
    softmax_entropy,
)

EMA_WEIGHT = 0.9  # the paper's moving average of the second loss


def margin_for(num_classes: int, factor: float = 0.4) -> float:
    """The reliable-sample margin ``E0 = factor * ln C`` (the paper's factor is 0.4)."""
    return factor * math.log(num_classes)


class Sar(nn.Module):
    """Adapt a TENT-configured model by SAR, one step per forward; ``reset`` restores it exactly."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        margin: float,
        *,
        rho: float = 0.05,
        reset_constant: float = 0.2,
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer = optimizer
        self.margin = margin
        self.rho = rho
        self.reset_constant = reset_constant
        self.ema: float | None = None
        self.resets = 0
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.model_state, self.optimizer_state = copy_model_and_optimizer(model, optimizer)

    def forward(self, x: Tensor) -> Tensor:
        """Adapt on ``x`` and return its logits (from the forward before the update)."""
        outputs, loss = self.step(x)
        if loss is not None:
            self.ema = loss if self.ema is None else EMA_WEIGHT * self.ema + (1 - EMA_WEIGHT) * loss
        if self.ema is not None and self.ema < self.reset_constant:
            self.reset()
            self.resets += 1
        return outputs

    @torch.enable_grad()
    def step(self, x: Tensor) -> tuple[Tensor, float | None]:
        """One sharpness-aware step on the reliable samples; the logits and the second loss."""
        self.optimizer.zero_grad()
        outputs: Tensor = self.model(x)
        entropy = softmax_entropy(outputs)
        reliable = entropy.detach() < self.margin
        if not bool(reliable.any()):
            return outputs.detach(), None
        torch.autograd.backward(entropy[reliable].mean(0))
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        norm = torch.norm(torch.stack([g.norm(2) for g in grads]), 2)
        perturbations = []
        with torch.no_grad():
            for p, g in zip(self.params, grads, strict=True):
                e = g * (self.rho / (norm + 1e-12))
                p.add_(e)
                perturbations.append(e)
        self.optimizer.zero_grad()
        second = softmax_entropy(self.model(x))[reliable]
        still = second < self.margin
        loss = float(second[still].detach().mean(0)) if bool(still.any()) else None
        if loss is not None:
            torch.autograd.backward(second[still].mean(0))
        with torch.no_grad():
            for p, e in zip(self.params, perturbations, strict=True):
                p.sub_(e)
        if loss is not None:
            self.optimizer.step()
        self.optimizer.zero_grad()
        return outputs.detach(), loss

    def reset(self) -> None:
        """Restore the model and optimizer to their states at construction, exactly."""
        load_model_and_optimizer(self.model, self.optimizer, self.model_state, self.optimizer_state)
        self.ema = None


def setup_sar(
    model: nn.Module,
    lr: float,
    *,
    margin_factor: float = 0.4,
    num_classes: int = 10,
    momentum: float = 0.9,
    rho: float = 0.05,
    reset_constant: float = 0.2,
) -> Sar:
    """Configure ``model`` in place as for TENT and wrap it with SAR (SGD with momentum on the BN
    affine parameters, the paper's optimizer)."""
    model = configure_model(model)
    params, _ = collect_params(model)
    check_model(model)
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum)
    return Sar(
        model, optimizer, margin_for(num_classes, margin_factor), rho=rho, reset_constant=reset_constant
    )

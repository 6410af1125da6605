"""L-inf attacks on any classifier given as a logits function: FGSM, PGD, and PGD with EOT.

A classifier is a :data:`LogitsFn` ``f(v, draw) -> (B, C)``: the input ``v`` and the index of a
random draw (a stochastic classifier such as CAMA's importance sampler uses it to pick its noise;
a deterministic one ignores it). For CAMA the logits are eq. 6's per-class log-weights
log p(x, y_c) (``cama.objectives.bayes_log_weights``), never its probabilities.

- FGSM (Goodfellow et al. 2015): ``v' = clip(v + eps sign(grad_v L(f(v), y)))``.
- PGD (Madry et al. 2018): a uniform random start in the eps-ball, then ``steps`` signed-gradient
  steps of ``step_size``, each projected back onto the eps-ball and the valid range.
- EOT (Athalye et al. 2018): each step's gradient is the mean over ``eot`` draws of the classifier's
  randomness, the gradient of E_draw L(f(v, draw), y).

The loss ``L`` is the margin ``max_{j != y} f_j - f_y`` (Carlini & Wagner 2017) by default: its
gradient does not vanish when the log-weights of the classes lie hundreds of nats apart, where the
softmax cross-entropy's does (it underflows to exactly zero, a masked gradient). ``"ce"`` is
the cross-entropy, as most attack libraries use. Only the coordinates where ``mask`` is 1 move
(the measurement attacks touch the children X and the co-parents C only); ``bounds`` is the valid
range (``None``: unbounded, as standardised measurements are).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

LogitsFn = Callable[[Tensor, int], Tensor]
Loss = Literal["margin", "ce"]


@dataclass(frozen=True)
class Attack:
    """One L-inf attack: FGSM is ``steps=1, random_start=False, step_size=eps``."""

    eps: float
    steps: int = 10
    step_size: float | None = None  # default 2.5 eps / steps (Madry et al.)
    random_start: bool = True
    eot: int = 1  # gradient draws per step
    loss: Loss = "margin"

    @classmethod
    def fgsm(cls, eps: float, *, eot: int = 1, loss: Loss = "margin") -> Attack:
        """The fast gradient sign method: one step of size ``eps`` from the clean input."""
        return cls(eps=eps, steps=1, step_size=eps, random_start=False, eot=eot, loss=loss)

    @property
    def alpha(self) -> float:
        """The step size."""
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps


def example_loss(logits: Tensor, y: Tensor, loss: Loss) -> Tensor:
    """Per input ``(B,)``: ``max_{j != y} f_j - f_y`` (margin) or ``-log softmax(f)_y`` (ce)."""
    logits = logits.float()
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return other - true


def attack_loss(logits: Tensor, y: Tensor, loss: Loss) -> Tensor:
    """:func:`example_loss` summed over the batch."""
    return example_loss(logits, y, loss).sum()


def _project(
    v: Tensor, origin: Tensor, eps: float, mask: Tensor, bounds: tuple[float, float] | None
) -> Tensor:
    """Back onto the eps-ball around ``origin`` (moved coordinates only) and the valid range."""
    v = origin + mask * (v - origin).clamp(-eps, eps)
    return v.clamp(*bounds) if bounds is not None else v


def expected_gradient(f: LogitsFn, v: Tensor, y: Tensor, loss: Loss, draws: range) -> Tensor:
    """``mean over draws of grad_v L(f(v, draw), y)``; one backward pass per draw (bounded memory)."""
    total = torch.zeros_like(v)
    for draw in draws:
        probe = v.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(attack_loss(f(probe, draw), y, loss), probe)
        total += grad
    return total / len(draws)


def perturb(
    f: LogitsFn,
    v: Tensor,
    y: Tensor,
    attack: Attack,
    *,
    mask: Tensor | None = None,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    generator: torch.Generator | None = None,
    first_draw: int = 0,
) -> Tensor:
    """The adversarial version of ``v`` under ``attack``: FGSM or PGD, EOT when ``attack.eot > 1``.

    Draw indices ``first_draw, first_draw + 1, ...`` feed ``f``: each gradient evaluation takes the
    next ``attack.eot`` of them, so a classifier that maps a draw index to fresh noise is attacked
    with fresh noise at every step (as a served model answers), and one that ignores the index
    (fixed noise) is a deterministic white-box target.
    """
    v = v.detach()
    mask = torch.ones_like(v) if mask is None else mask.to(v)
    adv = v.clone()
    if attack.random_start:
        noise = torch.rand(v.shape, generator=generator, device=v.device) * 2.0 - 1.0
        adv = _project(v + attack.eps * noise, v, attack.eps, mask, bounds)
    draw = first_draw
    for _ in range(attack.steps):
        grad = expected_gradient(f, adv, y, attack.loss, range(draw, draw + attack.eot))
        draw += attack.eot
        adv = _project(adv + attack.alpha * mask * grad.sign(), v, attack.eps, mask, bounds).detach()
    return adv


def batched_perturb(
    f: LogitsFn,
    v: Tensor,
    y: Tensor,
    attack: Attack,
    *,
    batch: int,
    mask: Tensor | None = None,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    seed: int = 0,
) -> Tensor:
    """:func:`perturb` over ``batch``-sized chunks (each chunk's draws continue the last one's)."""
    gen = torch.Generator(device=v.device).manual_seed(seed)
    out, draw = [], 0
    for start in range(0, v.shape[0], batch):
        sub_mask = None if mask is None else mask[start : start + batch]
        out.append(
            perturb(
                f,
                v[start : start + batch],
                y[start : start + batch],
                attack,
                mask=sub_mask,
                bounds=bounds,
                generator=gen,
                first_draw=draw,
            )
        )
        draw += attack.steps * attack.eot
    return torch.cat(out)


@torch.no_grad()
def strongest(
    f: LogitsFn,
    candidates: Sequence[Tensor],
    y: Tensor,
    *,
    draws: range,
    batch: int,
    loss: Loss = "margin",
) -> Tensor:
    """Per input, the candidate with the largest ``mean over draws of L(f(v, draw), y)``.

    An attack run at several budgets eps_1 < ... < eps_k keeps, for each input, the perturbation
    that does most harm among those inside the largest ball (each smaller ball lies inside it), as
    an attack with restarts keeps its best restart. Ties keep the earlier candidate.
    """
    best = candidates[0].clone()
    for start in range(0, y.shape[0], batch):
        part = slice(start, start + batch)
        scores = torch.stack(
            [
                torch.stack([example_loss(f(c[part], d), y[part], loss) for d in draws]).mean(0)
                for c in candidates
            ]
        )
        pick = scores.argmax(0)  # argmax returns the first maximum
        stacked = torch.stack([c[part] for c in candidates])
        best[part] = stacked[pick, torch.arange(pick.shape[0])]
    return best

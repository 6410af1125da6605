"""Selective test-time fine-tuning of NN_M^p and NN_M^q (paper eq. 8), and its promotion gate.

The shape follows tent: configure the model, collect the parameters to update, check the setup,
take steps under ``torch.enable_grad()``, reset. Everything that is not an m-dependent network
stays bit-identical. The same functions serve the evaluation scripts and the service's worker.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from cama.objectives import bayes_predict, finetune_objective, marginal_elbo, slice_cond
from cama.protocol import CamaModel, all_classes


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters of one adaptation job."""

    lr: float = 1e-3
    epochs: int = 3
    batch_size: int = 64
    alpha: float = 0.5
    seed: int = 0
    max_steps: int | None = None
    bf16: bool = False
    # "cosine": the step size decays to zero over the last ``decay_fraction`` of the run (less
    # step-to-step noise in the weights the run ends with); "constant": the paper's plain Adam
    lr_schedule: Literal["constant", "cosine"] = "constant"
    # with "cosine": the step size stays at ``lr`` and then decays along half a cosine to zero over
    # the last ``decay_fraction`` of the steps (1.0: over the whole run). A short decay keeps the
    # constant step's progress and still ends the run on a settled iterate
    decay_fraction: float = 1.0
    # "tail": return the mean of the iterates of the last ``average_fraction`` of the steps
    # (stochastic weight averaging, Izmailov et al. 2018) instead of the last iterate, whose
    # accuracy on data unlike the adaptation batch swings by a point or more from step to step.
    # Measured on MNIST shifts: it keeps the other shift's accuracy but, where the run is still
    # adapting in its second half, costs up to 29 points on the adapted one (docs/m_pathway.md),
    # so it is not the recipe
    average: Literal["none", "tail"] = "none"
    average_fraction: float = 0.5


@dataclass(frozen=True)
class StepResult:
    """One step's objective (eq. 8) and its two terms."""

    objective: float
    clean_elbo: float
    test_elbo: float
    lr: float = 0.0  # the step size this step was taken with


@dataclass
class FinetuneReport:
    """What a fine-tuning run did."""

    steps: int = 0
    cancelled: bool = False
    history: list[StepResult] = field(default_factory=list)


def index_cond(cond: Any, idx: Tensor) -> Any:
    """The rows ``idx`` of ``cond`` (a tensor, a tuple of tensors, or None)."""
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        return cond[idx]
    if isinstance(cond, tuple):
        return tuple(index_cond(part, idx) for part in cond)
    raise TypeError(f"unsupported cond type {type(cond).__name__}")


def collect_params(model: CamaModel) -> list[nn.Parameter]:
    """The parameters of NN_M^p and NN_M^q."""
    return model.m_parameters()


def configure_model(model: CamaModel) -> None:
    """Freeze everything, then let only NN_M^p and NN_M^q learn."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in collect_params(model):
        p.requires_grad_(True)


def check_model(model: CamaModel) -> None:
    """Refuse a model whose trainable set is not exactly NN_M^p and NN_M^q."""
    selected = {id(p) for p in collect_params(model)}
    if not selected:
        raise ValueError("the model has no m-dependent parameters to fine-tune")
    for name, p in model.named_parameters():
        if p.requires_grad != (id(p) in selected):
            raise ValueError(f"parameter {name} is trainable={p.requires_grad}, expected the opposite")


def snapshot(model: CamaModel) -> dict[str, Tensor]:
    """A copy of the whole state, for :func:`reset`."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def reset(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Restore the state taken by :func:`snapshot`, exactly."""
    model.load_state_dict(state, strict=True)


@torch.enable_grad()
def finetune_step(
    model: CamaModel,
    optimizer: torch.optim.Optimizer,
    clean: tuple[Tensor, Tensor],
    test_x: Tensor,
    alpha: float,
    *,
    bf16: bool = False,
    clean_cond: Any = None,
    test_cond: Any = None,
) -> StepResult:
    """One gradient step on eq. 8 (clean replay term with weight alpha, ELBO(x) on test data)."""
    autocast = torch.autocast(test_x.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    with autocast:
        objective, clean_elbo, test_elbo = finetune_objective(
            model, clean, test_x, alpha, cond_clean=clean_cond, cond_test=test_cond
        )
    optimizer.zero_grad(set_to_none=True)
    (-objective).backward()  # type: ignore[no-untyped-call]
    optimizer.step()
    return StepResult(
        objective.item(), clean_elbo.item(), test_elbo.item(), float(optimizer.param_groups[0]["lr"])
    )


def step_size_factor(total: int, decay_fraction: float, step: int) -> float:
    """The cosine schedule's factor on ``lr`` at 0-based ``step`` of ``total``: 1 until the last
    ``decay_fraction`` of the steps, then half a cosine from 1 towards 0."""
    decay = max(1, round(total * decay_fraction))
    into = step - (total - decay)
    return 1.0 if into <= 0 else 0.5 * (1.0 + math.cos(math.pi * into / decay))


def finetune(
    model: CamaModel,
    clean_x: Tensor,
    clean_y: Tensor,
    test_x: Tensor,
    cfg: FinetuneConfig,
    *,
    on_progress: Callable[[float, StepResult], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    clean_cond: Any = None,
    test_cond: Any = None,
) -> FinetuneReport:
    """Fine-tune NN_M^p and NN_M^q on unlabelled ``test_x`` with a clean replay sample (eq. 8).

    Each step pairs a mini-batch of ``test_x`` with a random mini-batch of the labelled clean data.
    ``clean_cond`` and ``test_cond`` carry the extra observed variables of each row (a tensor or a
    tuple of tensors, e.g. ``(a, c)`` for measurement data; ``None`` for images) and are indexed
    with the same rows. ``on_progress(fraction, step)`` reports progress; ``should_stop()``
    cancels between steps.
    """
    configure_model(model)
    check_model(model)
    params = collect_params(model)
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    n = test_x.shape[0]
    per_epoch = max(1, math.ceil(n / cfg.batch_size))
    total = per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)
    if not 0.0 < cfg.decay_fraction <= 1.0:
        raise ValueError(f"decay_fraction must be in (0, 1], got {cfg.decay_fraction}")
    scheduler = (
        torch.optim.lr_scheduler.LambdaLR(optimizer, partial(step_size_factor, total, cfg.decay_fraction))
        if cfg.lr_schedule == "cosine"
        else None
    )
    if not 0.0 < cfg.average_fraction <= 1.0:
        raise ValueError(f"average_fraction must be in (0, 1], got {cfg.average_fraction}")
    averaged = AveragedModel(cast(nn.Module, model)) if cfg.average == "tail" else None
    first_averaged = total - max(1, round(total * cfg.average_fraction)) + 1  # 1-based step number
    report = FinetuneReport()
    model.train()  # type: ignore[attr-defined]
    while report.steps < total:
        order = rng.permutation(n)
        for start in range(0, n, cfg.batch_size):
            if report.steps >= total:
                break
            if should_stop is not None and should_stop():
                report.cancelled = True
                return report
            idx = torch.from_numpy(order[start : start + cfg.batch_size])
            clean_idx = torch.from_numpy(rng.integers(0, clean_x.shape[0], size=idx.shape[0]))
            step = finetune_step(
                model,
                optimizer,
                (clean_x[clean_idx], clean_y[clean_idx]),
                test_x[idx],
                cfg.alpha,
                bf16=cfg.bf16,
                clean_cond=index_cond(clean_cond, clean_idx),
                test_cond=index_cond(test_cond, idx),
            )
            if scheduler is not None:
                scheduler.step()
            report.steps += 1
            if averaged is not None and report.steps >= first_averaged:
                averaged.update_parameters(cast(nn.Module, model))
            report.history.append(step)
            if on_progress is not None:
                on_progress(report.steps / total, step)
    if averaged is not None and int(averaged.n_averaged) > 0:
        with torch.no_grad():
            for p, mean in zip(params, collect_params(cast(CamaModel, averaged.module)), strict=True):
                p.copy_(mean)
    model.eval()  # type: ignore[attr-defined]
    for p in model.parameters():
        p.requires_grad_(False)
    return report


# --- promotion gate -------------------------------------------------------------------------


@dataclass(frozen=True)
class GateConfig:
    """A new version is promoted only if clean accuracy drops by at most ``max_clean_drop``
    (a fraction: 0.005 is half a point), held-out ELBO(x) rises by more than ``min_elbo_gain``
    the held-out predictions' label histogram moves away from p(y) by at most ``max_label_kl_rise``
    nats (:func:`label_marginal_kl`; a batch whose true labels are far from p(y), e.g. all one
    class, needs it relaxed or off) and their mean confidence max_c p(y_c|x) falls by at most
    ``max_confidence_drop``: an adaptation that explains the batch without the label (random
    noise images, say) leaves the posterior flat."""

    max_clean_drop: float = 0.005
    min_elbo_gain: float = 0.0
    max_label_kl_rise: float | None = 0.1  # nats; None switches the label-collapse check off
    max_confidence_drop: float | None = 0.2  # None switches the lost-label-information check off
    k: int = 10
    seed: int = 0


@dataclass(frozen=True)
class GateEvaluation:
    """Label-free and canary evidence about one model."""

    clean_accuracy: float
    heldout_elbo: float
    heldout_label_kl: float = 0.0  # KL(predicted-label histogram || p(y)) on the held-out inputs
    heldout_confidence: float = 1.0  # mean max_c p(y_c|x) on the held-out inputs (eq. 6)


@dataclass(frozen=True)
class GateDecision:
    """Whether to promote, with the evidence and the reasons for a refusal."""

    accepted: bool
    before: GateEvaluation
    after: GateEvaluation
    reasons: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "reasons": list(self.reasons),
            "clean_accuracy_before": self.before.clean_accuracy,
            "clean_accuracy_after": self.after.clean_accuracy,
            "heldout_elbo_before": self.before.heldout_elbo,
            "heldout_elbo_after": self.after.heldout_elbo,
            "heldout_label_kl_before": self.before.heldout_label_kl,
            "heldout_label_kl_after": self.after.heldout_label_kl,
            "heldout_confidence_before": self.before.heldout_confidence,
            "heldout_confidence_after": self.after.heldout_confidence,
        }


@torch.no_grad()
def gate_evaluation(
    model: CamaModel,
    canary_x: Tensor,
    canary_y: Tensor,
    heldout_x: Tensor,
    cfg: GateConfig,
    cond_canary: Any = None,
    cond_heldout: Any = None,
) -> GateEvaluation:
    """Clean canary accuracy (eq. 6), mean held-out ELBO(x) (eq. 7), how far the held-out
    predictions' label histogram is from the prior (:func:`label_marginal_kl`) and their mean
    posterior confidence max_c p(y_c|x) (eq. 6), with fixed noise."""
    gen = torch.Generator(device=canary_x.device).manual_seed(cfg.seed)
    pred = bayes_predict(model, canary_x, cond_canary, k=cfg.k, generator=gen)
    acc = float((pred.labels == canary_y).float().mean())
    gen = torch.Generator(device=heldout_x.device).manual_seed(cfg.seed)
    elbos = [
        marginal_elbo(model, heldout_x[i : i + 100], slice_cond(cond_heldout, i, i + 100), generator=gen)
        for i in range(0, heldout_x.shape[0], 100)
    ]
    gen = torch.Generator(device=heldout_x.device).manual_seed(cfg.seed)
    heldout_pred = bayes_predict(model, heldout_x, cond_heldout, k=cfg.k, generator=gen)
    return GateEvaluation(
        clean_accuracy=acc,
        heldout_elbo=float(torch.cat(elbos).mean()),
        heldout_label_kl=label_marginal_kl(model, heldout_pred.labels, cond_heldout),
        heldout_confidence=float(heldout_pred.probs.max(dim=1).values.float().mean()),
    )


def label_marginal_kl(model: CamaModel, labels: Tensor, cond: Any = None) -> float:
    """KL(histogram of predicted labels || p(y)) in nats, p(y) averaged over the rows' ``cond``.

    In CAMA's causal graph m has no arrow into y, so a manipulation leaves the label marginal
    where the prior puts it. An adaptation that explains the data through m alone collapses the
    predictions onto a few classes (observed: the appendix-C pathway fine-tuned on noise labels
    everything with one class); this statistic exposes that without labels. The histogram is
    smoothed with half a count per class.
    """
    c = model.num_classes
    log_prior = model.log_prior_y(all_classes(c, labels.device), cond).reshape(c, -1)  # (C, 1 or B)
    prior = log_prior.float().exp().mean(dim=1)
    prior = prior / prior.sum()
    counts = torch.bincount(labels.long(), minlength=c).float() + 0.5
    hist = counts / counts.sum()
    return float((hist * (hist.log() - prior.log())).sum())


def promotion_gate(before: GateEvaluation, after: GateEvaluation, cfg: GateConfig) -> GateDecision:
    """Promote only if clean accuracy held, the held-out ELBO(x) (eq. 7) rose, the held-out
    predictions did not collapse onto fewer classes and did not lose their confidence."""
    reasons: list[str] = []
    drop = before.clean_accuracy - after.clean_accuracy
    if drop > cfg.max_clean_drop:
        reasons.append(
            f"clean canary accuracy fell by {drop * 100:.2f} points "
            f"(limit {cfg.max_clean_drop * 100:.2f}): "
            f"{before.clean_accuracy:.4f} -> {after.clean_accuracy:.4f}"
        )
    if cfg.max_label_kl_rise is not None:
        rise = after.heldout_label_kl - before.heldout_label_kl
        if rise > cfg.max_label_kl_rise:
            reasons.append(
                f"predicted labels on the held-out batch moved away from p(y) by {rise:.3f} nats "
                f"(limit {cfg.max_label_kl_rise:.3f}; KL {before.heldout_label_kl:.3f} -> "
                f"{after.heldout_label_kl:.3f}): the adaptation collapses the classes"
            )
    if cfg.max_confidence_drop is not None:
        fall = before.heldout_confidence - after.heldout_confidence
        if fall > cfg.max_confidence_drop:
            reasons.append(
                f"mean confidence on the held-out batch fell by {fall:.3f} (limit "
                f"{cfg.max_confidence_drop:.3f}; {before.heldout_confidence:.3f} -> "
                f"{after.heldout_confidence:.3f}): the adapted model explains the batch without the label"
            )
    gain = after.heldout_elbo - before.heldout_elbo
    if not gain > cfg.min_elbo_gain:
        reasons.append(
            f"held-out ELBO(x) did not rise by more than {cfg.min_elbo_gain:.2f} nats: "
            f"{before.heldout_elbo:.2f} -> {after.heldout_elbo:.2f}"
        )
    return GateDecision(accepted=not reasons, before=before, after=after, reasons=tuple(reasons))

"""Selective test-time fine-tuning of NN_M^p and NN_M^q (paper eq. 8), and its promotion gate.

The shape follows tent: configure the model, collect the parameters to update, check the setup,
take steps under ``torch.enable_grad()``, reset. Everything that is not an m-dependent network
stays bit-identical. The same functions serve the evaluation scripts and the service's worker.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from cama.objectives import (
    SCREEN_MARGIN,
    Prediction,
    bayes_predict,
    finetune_objective,
    index_cond,
    marginal_elbo,
    slice_cond,
)
from cama.protocol import CamaModel, all_classes
from cama.runtime import bf16_native


@dataclass(frozen=True)
class FinetuneConfig:
    """The adaptation recipe: eq. 8, Adam on NN_M^p and NN_M^q, the one definition of its settings.

    Each checkpoint carries its model's recipe (``adapt_recipe`` in its provenance); the service,
    the evaluations and the benchmarks build it with :meth:`from_dict`. The defaults are the image
    recipe; :data:`MEASUREMENT_RECIPE` is the measurement model's.

    The number of optimiser steps is ``max(epochs * ceil(n / batch_size), min_steps)``, capped by
    ``max_steps``: a small batch still gets ``min_steps`` steps (many passes over it), a large one
    ``epochs`` passes. With ``lr_schedule="cosine"`` the step size stays at ``lr`` and then decays
    along half a cosine to zero over the last ``decay_fraction`` of the steps, so that the run ends
    on a settled iterate; ``"constant"`` is the paper's plain Adam. ``bf16``: bfloat16 autocast
    where the device computes it in hardware (:func:`cama.runtime.bf16_native`), float32 elsewhere.
    """

    lr: float = 1e-3
    epochs: int = 2
    batch_size: int = 32
    min_steps: int = 200
    max_steps: int | None = None
    alpha: float = 0.5
    bf16: bool = True
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    decay_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        checks = (
            (0.0 < self.lr <= 1.0, "lr must be in (0, 1]"),
            (1 <= self.epochs <= 1000, "epochs must be in [1, 1000]"),
            (1 <= self.batch_size <= 4096, "batch_size must be in [1, 4096]"),
            (0 <= self.min_steps <= 100_000, "min_steps must be in [0, 100000]"),
            (self.max_steps is None or 1 <= self.max_steps <= 1_000_000, "max_steps must be in [1, 1000000]"),
            (0.0 <= self.alpha <= 1.0, "alpha must be in [0, 1]"),
            (self.lr_schedule in ("constant", "cosine"), "lr_schedule must be 'constant' or 'cosine'"),
            (0.0 < self.decay_fraction <= 1.0, "decay_fraction must be in (0, 1]"),
            (0 <= self.seed < 2**31, "seed must be in [0, 2**31)"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def steps(self, n: int) -> int:
        """Optimiser steps for ``n`` unlabelled inputs."""
        total = max(self.epochs * max(1, math.ceil(n / self.batch_size)), self.min_steps)
        return total if self.max_steps is None else min(total, self.max_steps)

    def as_dict(self) -> dict[str, Any]:
        """Every setting, by name (what a checkpoint's ``adapt_recipe`` stores)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: FinetuneConfig | None = None) -> FinetuneConfig:
        """``base`` (default: the defaults) with the settings in ``data``; unknown names, a wrong
        type or a value out of range raise ``ValueError``."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown recipe settings {unknown}; known: {sorted(known)}")
        for name, value in data.items():
            if not _recipe_type_ok(name, value):
                raise ValueError(f"{name} has the wrong type: {value!r}")
        return dataclasses.replace(base or cls(), **data)


def _recipe_type_ok(name: str, value: Any) -> bool:
    """Strict types for recipe settings: no booleans as numbers, no strings as numbers."""
    if name == "bf16":
        return isinstance(value, bool)
    if name == "lr_schedule":
        return isinstance(value, str)
    if name == "max_steps" and value is None:
        return True
    if name in ("lr", "alpha", "decay_fraction"):
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, int) and not isinstance(value, bool)


# the measurement model's recipe (paper section 4.2): its small tables adapt with plain Adam
MEASUREMENT_RECIPE = FinetuneConfig(
    lr=1e-3, epochs=20, batch_size=50, min_steps=0, alpha=0.9, bf16=False, lr_schedule="constant"
)


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
    total = cfg.steps(n)
    scheduler = (
        torch.optim.lr_scheduler.LambdaLR(optimizer, partial(step_size_factor, total, cfg.decay_fraction))
        if cfg.lr_schedule == "cosine"
        else None
    )
    report = FinetuneReport()
    bf16 = cfg.bf16 and bf16_native(test_x.device)  # emulated bfloat16 is slower than float32
    model.train()  # type: ignore[attr-defined]
    try:
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
                    bf16=bf16,
                    clean_cond=index_cond(clean_cond, clean_idx),
                    test_cond=index_cond(test_cond, idx),
                )
                if scheduler is not None:
                    scheduler.step()
                report.steps += 1
                report.history.append(step)
                if on_progress is not None:
                    on_progress(report.steps / total, step)
    finally:
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
    ``max_confidence_drop`` and stays at least ``min_confidence``: an adaptation that explains the
    batch without the label (random noise images, say) leaves the posterior flat. Predictions use
    the served path: eq. 6 with ``k`` samples behind the first-sample screen of ``screen`` nats
    (None: all K everywhere)."""

    max_clean_drop: float = 0.005
    min_elbo_gain: float = 0.0
    max_label_kl_rise: float | None = 0.1  # nats; None switches the label-collapse check off
    max_confidence_drop: float | None = 0.2  # None switches the lost-label-information check off
    # the adapted model's mean confidence on the held-out batch must reach this: a batch that no
    # class explains (noise, another kind of image) is not a manipulation of the classes. Chosen on
    # the validation suite (python -m experiments.evaluate_mnistc --suite validation): after adapting,
    # the named manipulations keep 0.89-1.0 and a batch of uniform noise 0.31-0.35
    min_confidence: float | None = 0.5
    k: int = 10
    seed: int = 0
    screen: float | None = SCREEN_MARGIN


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


class AdaptationCancelledError(Exception):
    """``should_stop()`` asked an adaptation to stop: nothing it changed is kept."""


@torch.no_grad()
def gate_evaluation(
    model: CamaModel,
    canary_x: Tensor,
    canary_y: Tensor,
    heldout_x: Tensor,
    cfg: GateConfig,
    cond_canary: Any = None,
    cond_heldout: Any = None,
    *,
    should_stop: Callable[[], bool] | None = None,
    chunk: int = 100,
) -> GateEvaluation:
    """Clean canary accuracy (eq. 6), mean held-out ELBO(x) (eq. 7), how far the held-out
    predictions' label histogram is from the prior (:func:`label_marginal_kl`) and their mean
    posterior confidence max_c p(y_c|x) (eq. 6), with fixed noise.

    ``should_stop()`` is asked between chunks of ``chunk`` inputs; when it says so,
    :class:`AdaptationCancelledError` is raised.
    """

    def stop_point() -> None:
        if should_stop is not None and should_stop():
            raise AdaptationCancelledError

    def predict(x: Tensor, cond: Any) -> Prediction:
        gen = torch.Generator(device=x.device).manual_seed(cfg.seed)
        parts = []
        for i in range(0, x.shape[0], chunk):
            stop_point()
            sub = slice_cond(cond, i, i + chunk)
            parts.append(
                bayes_predict(model, x[i : i + chunk], sub, k=cfg.k, generator=gen, screen=cfg.screen)
            )
        return Prediction.concat(parts)

    pred = predict(canary_x, cond_canary)
    acc = float((pred.labels == canary_y).float().mean())
    gen = torch.Generator(device=heldout_x.device).manual_seed(cfg.seed)
    elbos = []
    for i in range(0, heldout_x.shape[0], chunk):
        stop_point()
        sub = slice_cond(cond_heldout, i, i + chunk)
        elbos.append(marginal_elbo(model, heldout_x[i : i + chunk], sub, generator=gen))
    heldout_pred = predict(heldout_x, cond_heldout)
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
    if cfg.min_confidence is not None and after.heldout_confidence < cfg.min_confidence:
        reasons.append(
            f"mean confidence on the held-out batch is {after.heldout_confidence:.3f} after adapting "
            f"(at least {cfg.min_confidence:.3f} needed): no class explains the batch"
        )
    gain = after.heldout_elbo - before.heldout_elbo
    if not gain > cfg.min_elbo_gain:
        reasons.append(
            f"held-out ELBO(x) did not rise by more than {cfg.min_elbo_gain:.2f} nats: "
            f"{before.heldout_elbo:.2f} -> {after.heldout_elbo:.2f}"
        )
    return GateDecision(accepted=not reasons, before=before, after=after, reasons=tuple(reasons))


# --- adapt, then judge ------------------------------------------------------------------------


@dataclass(frozen=True)
class Labelled:
    """Labelled clean data: eq. 8's replay term, or the gate's canary set."""

    x: Tensor
    y: Tensor
    cond: Any = None


@dataclass(frozen=True)
class AdaptOutcome:
    """What :func:`adapt_and_judge` did: the gate's decision and the fine-tuning run."""

    decision: GateDecision
    report: FinetuneReport
    finetune_seconds: float
    train_inputs: int
    heldout_inputs: int

    @property
    def accepted(self) -> bool:
        return self.decision.accepted

    def metrics(self) -> dict[str, float]:
        """Flat numbers for a job record or a version's manifest."""
        before, after = self.decision.before, self.decision.after
        out = {
            "steps": float(self.report.steps),
            "finetune_seconds": round(self.finetune_seconds, 3),
            "train_inputs": float(self.train_inputs),
            "heldout_inputs": float(self.heldout_inputs),
            "canary_accuracy_before": before.clean_accuracy,
            "canary_accuracy_after": after.clean_accuracy,
            "heldout_elbo_before": before.heldout_elbo,
            "heldout_elbo_after": after.heldout_elbo,
            "heldout_label_kl_before": before.heldout_label_kl,
            "heldout_label_kl_after": after.heldout_label_kl,
            "heldout_confidence_before": before.heldout_confidence,
            "heldout_confidence_after": after.heldout_confidence,
        }
        if self.report.history:
            out["final_objective"] = self.report.history[-1].objective
        return out


HOLDOUT_FRACTION = 0.2  # of an unlabelled adaptation batch, held out for the gate by default


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(heldout, train)`` of an unlabelled batch of ``n``: a seeded permutation, its
    first ``round(fraction * n)`` (at least 1) held out for the gate."""
    if n < 2:
        raise ValueError("an adaptation batch needs at least 2 inputs")
    order = np.random.default_rng(seed).permutation(n)
    n_hold = min(n - 1, max(1, round(fraction * n)))
    return order[:n_hold], order[n_hold:]


def adapt_and_judge(
    model: CamaModel,
    train_x: Tensor,
    heldout_x: Tensor,
    recipe: FinetuneConfig,
    gate: GateConfig,
    *,
    replay: Labelled,
    canary: Labelled,
    train_cond: Any = None,
    heldout_cond: Any = None,
    keep_refused: bool = False,
    on_progress: Callable[[float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> AdaptOutcome:
    """Gate evidence before, selective fine-tuning on ``train_x`` (eq. 8), evidence after, and the
    promotion gate's decision: the one adapt-then-judge sequence of the service and the evaluations.

    The model is changed in place. A refused adaptation is undone (the model restored bit for bit)
    unless ``keep_refused``; a cancelled one (``should_stop()``, asked between steps and between
    chunks of the gate's evaluations) is undone and raises :class:`AdaptationCancelledError`.
    ``on_progress(fraction)`` reports progress in [0, 1].
    """
    state = snapshot(model)
    gate_share = 0.08  # the progress share of each gate evaluation

    def progress(fraction: float) -> None:
        if on_progress is not None:
            on_progress(fraction)

    def evaluate() -> GateEvaluation:
        return gate_evaluation(
            model, canary.x, canary.y, heldout_x, gate, canary.cond, heldout_cond, should_stop=should_stop
        )

    try:
        before = evaluate()
        progress(gate_share)
        t0 = time.perf_counter()
        report = finetune(
            model,
            replay.x,
            replay.y,
            train_x,
            recipe,
            on_progress=lambda f, _: progress(gate_share + (1 - 2 * gate_share) * f),
            should_stop=should_stop,
            clean_cond=replay.cond,
            test_cond=train_cond,
        )
        seconds = time.perf_counter() - t0
        if report.cancelled:
            raise AdaptationCancelledError
        after = evaluate()
    except BaseException:
        reset(model, state)  # type: ignore[arg-type]
        raise
    decision = promotion_gate(before, after, gate)
    if not decision.accepted and not keep_refused:
        reset(model, state)  # type: ignore[arg-type]
    progress(1.0)
    return AdaptOutcome(
        decision=decision,
        report=report,
        finetune_seconds=seconds,
        train_inputs=int(train_x.shape[0]),
        heldout_inputs=int(heldout_x.shape[0]),
    )


def adapt_batch(
    model: CamaModel,
    batch_x: Tensor,
    recipe: FinetuneConfig,
    gate: GateConfig,
    *,
    replay: Labelled,
    canary: Labelled,
    batch_cond: Any = None,
    holdout_fraction: float = HOLDOUT_FRACTION,
    keep_refused: bool = False,
    on_progress: Callable[[float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> AdaptOutcome:
    """What ``POST /adapt`` does with one unlabelled batch: hold out ``holdout_fraction`` of it for
    the gate (:func:`holdout_split`, seeded by the recipe), adapt on the rest and judge
    (:func:`adapt_and_judge`); a refused adaptation leaves the model as it was (unless
    ``keep_refused``: an evaluation that scores what the gate refused)."""
    held, train = (
        torch.from_numpy(i) for i in holdout_split(batch_x.shape[0], holdout_fraction, recipe.seed)
    )
    held, train = held.to(batch_x.device), train.to(batch_x.device)
    return adapt_and_judge(
        model,
        batch_x[train],
        batch_x[held],
        recipe,
        gate,
        replay=replay,
        canary=canary,
        train_cond=index_cond(batch_cond, train),
        heldout_cond=index_cond(batch_cond, held),
        keep_refused=keep_refused,
        on_progress=on_progress,
        should_stop=should_stop,
    )
